#!/usr/bin/env bash
# Metadata ops/s (tests/stress/bench_meta.py) on a private, throw-away MariaDB server
# started like the test fixture's (own datadir, loopback port, --no-defaults), then on
# SQLite for comparison. The server is always shut down and its datadir removed.
#
#   bash tests/stress/bench_meta_mariadb.sh [--files N] [--tasks N]
#   FLUSH=1 bash tests/stress/bench_meta_mariadb.sh   # innodb_flush_log_at_trx_commit (default 2)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-bench-meta.XXXXXX")
sbin=/usr/sbin:/usr/local/sbin:$PATH
mariadbd=$(PATH=$sbin command -v mariadbd)
as_root=()
[ "$(id -u)" -eq 0 ] && as_root=(--user=root)
small=(--innodb-buffer-pool-size=32M --innodb-log-file-size=8M)
mariadb-install-db --no-defaults --datadir="$tmp/data" --auth-root-authentication-method=normal \
    --skip-test-db "${as_root[@]}" "${small[@]}" >"$tmp/install.log" 2>&1
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
setpriv --pdeathsig TERM "$mariadbd" --no-defaults "${as_root[@]}" --datadir="$tmp/data" \
    --socket="$tmp/sock" --port="$port" --bind-address=127.0.0.1 --log-error="$tmp/error.log" \
    --skip-name-resolve --innodb-flush-log-at-trx-commit="${FLUSH:-2}" "${small[@]}" &
server=$!
stop() {
    mariadb-admin --no-defaults --socket="$tmp/sock" -uroot shutdown 2>/dev/null || kill "$server"
    wait "$server" 2>/dev/null || true
    rm -rf "$tmp"
}
trap stop EXIT
for _ in $(seq 600); do
    mariadb-admin --no-defaults --socket="$tmp/sock" -uroot ping >/dev/null 2>&1 && break
    sleep 0.05
done
mariadb --no-defaults --socket="$tmp/sock" -uroot -e "CREATE USER 'bench'@'127.0.0.1'
    IDENTIFIED BY 'bench'; CREATE DATABASE cloudfs_bench;
    GRANT ALL ON cloudfs_bench.* TO 'bench'@'127.0.0.1'"
echo "== MariaDB $("$mariadbd" --version | awk '{print $3}') (innodb_flush_log_at_trx_commit=${FLUSH:-2})"
CLOUDFS_MYSQL_PASSWORD=bench .venv/bin/python tests/stress/bench_meta.py \
    --metadata "mysql://bench@127.0.0.1:$port/cloudfs_bench" "$@"
echo "== SQLite (synchronous=NORMAL, WAL)"
.venv/bin/python tests/stress/bench_meta.py --metadata "$tmp/meta.db" "$@"
