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
source tests/stress/_mariadb.sh
stop() {
    mariadb_stop "$tmp"
    rm -rf "$tmp"
}
trap stop EXIT
mariadb_start "$tmp" .venv/bin/python --innodb-flush-log-at-trx-commit="${FLUSH:-2}" \
    --innodb-buffer-pool-size=32M --innodb-log-file-size=8M
port=$mariadb_port
CLOUDFS_MYSQL_PASSWORD=bench .venv/bin/python tests/stress/bench_meta.py \
    --metadata "mysql://bench@127.0.0.1:$port/cloudfs_bench" "$@"
echo "== SQLite (synchronous=NORMAL, WAL)"
.venv/bin/python tests/stress/bench_meta.py --metadata "$tmp/meta.db" "$@"
