#!/usr/bin/env bash
# `cloudfs bench` small-file figures of a real mount with MySQL metadata beside one with
# SQLite metadata, on this machine. MariaDB is a private, throw-away server (own datadir,
# loopback port, --no-defaults) with DURABLE settings (innodb_flush_log_at_trx_commit=1,
# the server's default buffer pool): the figures users get, unlike the test fixture's
# relaxed server. Everything is stopped, unmounted and removed at the end.
#
#   bash tests/stress/bench_mount_mariadb.sh [--small-count 10000] [cloudfs bench args...]
#   ENGINES=mysql bash tests/stress/bench_mount_mariadb.sh   # one engine only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=${CLOUDFS_BIN:-$PWD/.venv/bin}  # another checkout's venv: CLOUDFS_BIN=/path/.venv/bin
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-bench-mount.XXXXXX")
source tests/stress/_mariadb.sh
mounts=()
stop() {
    for m in "${mounts[@]}"; do
        mountpoint -q "$m" && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }
    done
    for engine in mysql sqlite; do stop_daemon "$engine"; done
    mariadb_stop "$tmp"
    sleep 1  # the daemons' exit
    rm -rf "$tmp"
}
trap stop EXIT

export CLOUDFS_PASSPHRASE="bench passphrase" CLOUDFS_MYSQL_PASSWORD=bench
bench_args=(--big-size 16M --edit-size 16M --small-count 10000 "$@")

run_engine() {  # ENGINE [mkfs args...]
    local engine=$1; shift
    mkdir -p "$tmp/$engine/mnt"
    "$bin/mkfs.cloudfs" "local://$tmp/$engine/store" --cachedir "$tmp/$engine/cache" "$@" >/dev/null
    "$bin/mount.cloudfs" "local://$tmp/$engine/store" "$tmp/$engine/mnt" --cachedir "$tmp/$engine/cache" --upload=async
    mounts+=("$tmp/$engine/mnt")
    echo "== $engine"
    local pid questions=
    pid=$(pgrep -f "mount.cloudfs .*$tmp/$engine/mnt" | head -1)
    [ "$engine" = mysql ] && questions=$(server_questions)
    "$bin/cloudfs" bench "$tmp/$engine/mnt" "${bench_args[@]}"
    # figures that move less with the machine's load than the rates above
    awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); printf "mount CPU: %.1f s\n", ($12 + $13) / hz}' "/proc/$pid/stat"
    [ "$engine" = mysql ] && echo "statements the server ran: $(( $(server_questions) - questions ))"
    fusermount3 -u "$tmp/$engine/mnt"
    stop_daemon "$engine"
}

stop_daemon() {  # ENGINE: its cloudfsd (it would wait for a database that is about to go)
    local pid
    for pid in $(pgrep -f "cloudfs.daemon.main --cachedir $tmp/$1/cache" || true); do
        kill -TERM "$pid" 2>/dev/null || true
    done
}

server_questions() {
    mariadb_sql "$tmp" "SHOW GLOBAL STATUS LIKE 'Questions'" | awk '{print $2}'
}

for engine in ${ENGINES:-mysql sqlite}; do
    if [ "$engine" = mysql ]; then
        mariadb_start "$tmp" "$bin/python" --innodb-flush-log-at-trx-commit=1
        run_engine mysql --metadata "mysql://bench@127.0.0.1:$mariadb_port/cloudfs_bench"
    else
        run_engine sqlite
    fi
done
