#!/usr/bin/env bash
# Run fsx (the file system exerciser of xfstests) on a fresh cloudfs mount.
#
#   bash tools/run_fsx.sh XFSTESTS_SOURCE_DIR [fsx args...]
#
# XFSTESTS_SOURCE_DIR is a checkout of xfstests (nothing is fetched); ltp/fsx.c and
# the two headers it needs from src/ are copied to a temporary directory and built
# there with a few include shims in place of xfstests' configure step. Without fsx
# arguments it runs 100,000 operations, mapped reads and writes included, on a file
# of up to 8 MiB (several blocks): -N 100000 -S 1 -l 8388608. Exits with fsx's status.
set -euo pipefail
src=${1:?usage: run_fsx.sh XFSTESTS_SOURCE_DIR [fsx args...]}
shift
for f in ltp/fsx.c src/global.h src/statx.h; do
    [ -f "$src/$f" ] || { echo "run_fsx.sh: no $f in $src" >&2; exit 2; }
done
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-N 100000 -S 1 -l 8388608)
source "$(dirname "${BASH_SOURCE[0]}")/_scratchfs.sh"

build=$(mktemp -d "${TMPDIR:-/tmp}/fsx-build.XXXXXX")
cleanup_all() { scratch_fs_stop; rm -rf "$build"; }
trap cleanup_all EXIT
trap 'exit 130' INT TERM
cp "$src/ltp/fsx.c" "$src/src/global.h" "$src/src/statx.h" "$build/"
# what xfstests' configure would have found on Linux with glibc
cat >"$build/config.h" <<'SHIM'
#define HAVE_SYS_TYPES_H 1
#define HAVE_SYS_STAT_H 1
#define HAVE_SYS_STATVFS_H 1
#define HAVE_SYS_TIME_H 1
#define HAVE_SYS_IOCTL_H 1
#define HAVE_SYS_WAIT_H 1
#define HAVE_MALLOC_H 1
#define HAVE_DIRENT_H 1
#define HAVE_STDLIB_H 1
#define HAVE_UNISTD_H 1
#define HAVE_ERRNO_H 1
#define HAVE_STRING_H 1
#define HAVE_FCNTL_H 1
#define HAVE_SYS_PARAM_H 1
#define HAVE_LIBGEN_H 1
#define HAVE_ASSERT_H 1
#define HAVE_STRINGS_H 1
#define HAVE_SIGNAL_H 1
#define HAVE_ERR_H 1
#define HAVE_LINUX_FALLOC_H 1
#include <getopt.h>
SHIM
echo "==> building fsx in $build" >&2
gcc -O2 -D_GNU_SOURCE -DFALLOCATE -DHAVE_COPY_FILE_RANGE -I"$build" -o "$build/fsx" \
    "$build/fsx.c" 2>"$build/build.log" || { tail -20 "$build/build.log" >&2; exit 1; }

scratch_fs_start ""
echo "==> fsx ${args[*]} $MNT/fsx.file" >&2
set +e
(cd "$build" && ./fsx "${args[@]}" -P "$build" "$MNT/fsx.file")
status=$?
set -e
if [ "$status" -ne 0 ]; then
    echo "==> fsx failed (status $status); its log:" >&2
    tail -40 "$build"/fsx.file.fsxlog >&2 || true
fi
echo "==> fsx on cloudfs: exit status $status"
exit "$status"
