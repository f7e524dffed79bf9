# Sourced by the stress scripts: a private, throw-away MariaDB server started like the
# test fixture's (own datadir under $tmp, loopback port, --no-defaults), with a user
# `bench` (password `bench`) owning the database `cloudfs_bench`.
#
#   mariadb_start TMP PYTHON [mariadbd options...]   # sets mariadb_pid and mariadb_port
#   mariadb_stop TMP
#   mariadb_sql TMP "SQL"                             # as root, on the socket

mariadb_pid=
mariadb_port=

mariadb_start() {
    local tmp=$1 python=$2; shift 2
    local mariadbd as_root=()
    mariadbd=$(PATH=/usr/sbin:/usr/local/sbin:$PATH command -v mariadbd)
    [ "$(id -u)" -eq 0 ] && as_root=(--user=root)
    mariadb-install-db --no-defaults --datadir="$tmp/data" --auth-root-authentication-method=normal \
        --skip-test-db "${as_root[@]}" "$@" >"$tmp/install.log" 2>&1
    mariadb_port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    setpriv --pdeathsig TERM "$mariadbd" --no-defaults "${as_root[@]}" --datadir="$tmp/data" \
        --socket="$tmp/sock" --port="$mariadb_port" --bind-address=127.0.0.1 \
        --log-error="$tmp/error.log" --skip-name-resolve "$@" &
    mariadb_pid=$!
    for _ in $(seq 600); do
        mariadb-admin --no-defaults --socket="$tmp/sock" -uroot ping >/dev/null 2>&1 && break
        sleep 0.05
    done
    mariadb_sql "$tmp" "CREATE USER 'bench'@'127.0.0.1' IDENTIFIED BY 'bench';
        CREATE DATABASE cloudfs_bench; GRANT ALL ON cloudfs_bench.* TO 'bench'@'127.0.0.1'"
    echo "== MariaDB $("$mariadbd" --version | awk '{print $3}') ($*)"
}

mariadb_stop() {
    [ -n "$mariadb_pid" ] || return 0
    mariadb-admin --no-defaults --socket="$1/sock" -uroot shutdown 2>/dev/null || kill "$mariadb_pid"
    wait "$mariadb_pid" 2>/dev/null || true
    mariadb_pid=
}

mariadb_sql() {
    mariadb --no-defaults --socket="$1/sock" -uroot -N -e "$2"
}
