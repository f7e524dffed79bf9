#!/usr/bin/env bash
# Run the pjdfstest POSIX suite inside a fresh cloudfs mount and print its counts.
#
#   sudo bash tools/run_pjdfstest.sh PJDFSTEST_SOURCE_DIR [prove args...]
#
# PJDFSTEST_SOURCE_DIR is a checkout of https://github.com/pjd/pjdfstest (nothing is
# fetched). It is copied to a temporary directory and built there (autoconf, automake,
# a C compiler), then run as root with `prove -r` from inside a new filesystem mounted
# with -o allow_other,default_permissions. The filesystem is unmounted and removed
# afterwards. Exits with prove's status.
set -euo pipefail
src=${1:?usage: run_pjdfstest.sh PJDFSTEST_SOURCE_DIR [prove args...]}
shift
if [ "$(id -u)" -ne 0 ]; then
    echo "run_pjdfstest.sh: pjdfstest must run as root (it changes owners and modes)" >&2
    exit 2
fi
[ -f "$src/pjdfstest.c" ] || { echo "run_pjdfstest.sh: no pjdfstest.c in $src" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/_scratchfs.sh"

build=$(mktemp -d "${TMPDIR:-/tmp}/pjdfstest-build.XXXXXX")
cleanup_all() { scratch_fs_stop; rm -rf "$build"; }
trap cleanup_all EXIT
trap 'exit 130' INT TERM
chmod 755 "$build"  # its tests run some steps as other users
cp -a "$src/." "$build/"
echo "==> building pjdfstest in $build" >&2
if ! (cd "$build" && autoreconf -ifs && ./configure && make pjdfstest) >"$build/build.log" 2>&1; then
    tail -20 "$build/build.log" >&2
    exit 1
fi

scratch_fs_start "allow_other,default_permissions"
cd "$MNT"
set +e
prove -r "$@" "$build/tests" 2>&1 | tee "$SCRATCH/prove.log"
status=${PIPESTATUS[0]}
set -e
echo
echo "==> pjdfstest on cloudfs: $(grep -E '^Files=' "$SCRATCH/prove.log" | sed 's/, [0-9]* wallclock.*//')" \
     "$(grep -E '^Result:' "$SCRATCH/prove.log")"
grep -E '^Failed [0-9]+/[0-9]+ test programs' "$SCRATCH/prove.log" | sed 's/^/==> /' || true
exit "$status"
