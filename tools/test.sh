#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian machine, then run it.
#
#   bash tools/test.sh [pytest args...]
#
# Installs the missing apt packages (apt-get update first, non-interactive), makes
# .venv with `python3 -m venv` if there is none (Debian's python3 or pyenv's), runs
# `pip install -e '.[test]'`, then the whole suite with a per-test timeout
# (CLOUDFS_TEST_TIMEOUT seconds, default 900) in CLOUDFS_TEST_WORKERS processes
# (pytest-xdist, default 2; each starts its own moto, MariaDB and Redis on free
# loopback ports; 1 runs everything in this process). Without arguments, a second run
# puts the metadata-heavy integration tests on MariaDB (CLOUDFS_TEST_MYSQL_PASS=0: not).
# Exits with the worst pytest status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

# --- apt packages ----------------------------------------------------------------------
packages=(fuse3 libfuse3-dev pkg-config libzstd-dev libssl-dev mariadb-server redis-server
          python3-venv build-essential)
# Debian's own python3 needs its headers to build the extensions (pyenv's has them)
if [ "$(command -v python3 || true)" = /usr/bin/python3 ]; then
    packages+=(python3-dev)
fi
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    log "installing apt packages: ${missing[*]}"
    "${sudo[@]}" apt-get update
    # no service may start or prompt while installing (containers have no init)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}"
fi

# --- virtualenv and the package ----------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $(command -v python3) ($(python3 --version 2>&1))"
    python3 -m venv .venv
fi
# the build requirements go into the venv too: the packaging test builds a wheel
# with --no-build-isolation
mapfile -t build_requires < <(.venv/bin/python -c 'import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))')
log "pip install ${build_requires[*]}"
.venv/bin/python -m pip install -q "${build_requires[@]}"
log "pip install -e '.[test]'"
.venv/bin/python -m pip install -q -e '.[test]'

# --- tests ------------------------------------------------------------------------------
if [ ! -c /dev/fuse ]; then
    log "warning: /dev/fuse is missing: the integration tests (real mounts) will fail"
fi
report=$(mktemp "${TMPDIR:-/tmp}/cloudfs-test.XXXXXX")
trap 'rm -f "$report"' EXIT
workers=${CLOUDFS_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 1 ]; then
    parallel=(-n "$workers" --dist worksteal)
fi
run_pytest() {
    log "python -m pytest --import-mode=importlib -q ${parallel[*]} $*"
    set +e
    .venv/bin/python -m pytest --import-mode=importlib -q "${parallel[@]}" \
        --timeout="${CLOUDFS_TEST_TIMEOUT:-900}" --durations=25 "$@" 2>&1 | tee "$report"
    status=${PIPESTATUS[0]}
    set -e
    summary=$(grep -E '(passed|failed|error|errors|skipped|no tests ran)( |,|$)' "$report" \
              | grep -E ' in [0-9.]+s' | tail -n 1 || true)
    summaries+=("${summary:-no summary line (exit status $status)}")
    if [ "$status" -ne 0 ]; then
        worst=$status
    fi
}
summaries=()
worst=0
run_pytest tests "$@"
# Without arguments (CI): the integration tests whose subject is the metadata (POSIX
# semantics, history, fsck) once more with their metadata on the private MariaDB.
# CLOUDFS_TEST_MYSQL_PASS=0 skips it; the whole integration suite on both engines is
# `bash tools/test.sh --metadata=sqlite,mysql` (about 14 more minutes
# here than on SQLite alone, so not in every run).
if [ "$#" -eq 0 ] && [ "${CLOUDFS_TEST_MYSQL_PASS:-1}" != 0 ]; then
    run_pytest --metadata=mysql tests/integration/test_posix_{rename,links,perms,times,xattr,sizes,open_unlinked,locks,mmap}.py \
        tests/integration/test_history_{versions,trash,retention,view}.py tests/integration/test_fsck.py
fi
echo
for summary in "${summaries[@]}"; do
    echo "pytest: $summary"
done
exit "$worst"
