# Sourced by tools/run_pjdfstest.sh and tools/run_fsx.sh: a fresh cloudfs filesystem
# in a temporary directory, mounted, and always unmounted and stopped on exit.
#
#   trap scratch_fs_stop EXIT          # (or a function of the caller that calls it)
#   scratch_fs_start "mount options"   # sets SCRATCH (the work dir) and MNT
#   ... work in "$MNT" ...

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLOUDFS_BIN=${CLOUDFS_BIN:-$repo/.venv/bin}
SCRATCH=""
MNT=""

scratch_fs_stop() {
    [ -n "$SCRATCH" ] || return 0
    cd /
    if mountpoint -q "$MNT"; then
        fusermount3 -u "$MNT" 2>/dev/null || { sleep 2; fusermount3 -u "$MNT" 2>/dev/null; } \
            || fusermount3 -uz "$MNT" || true
    fi
    local pid
    # the mount process seals what was closed last, then exits; the daemon follows
    for f in mount.lock daemon.pid; do
        pid=$(head -c 16 "$SCRATCH/cache/$f" 2>/dev/null | tr -dc 0-9 || true)
        [ -n "$pid" ] || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$SCRATCH"
    SCRATCH=""
}

scratch_fs_start() {
    local options=$1
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-scratch.XXXXXX")
    MNT=$SCRATCH/mnt
    chmod 755 "$SCRATCH"  # other users' processes reach the mount point through it
    mkdir -p "$MNT"
    (umask 077 && head -c 24 /dev/urandom | base64 > "$SCRATCH/passphrase")
    "$CLOUDFS_BIN/mkfs.cloudfs" "local://$SCRATCH/store" --cachedir "$SCRATCH/cache" \
        --passphrase-file "$SCRATCH/passphrase" >/dev/null
    "$CLOUDFS_BIN/mount.cloudfs" "local://$SCRATCH/store" "$MNT" --cachedir "$SCRATCH/cache" \
        --passphrase-file "$SCRATCH/passphrase" ${options:+-o "$options"}
    echo "==> cloudfs mounted on $MNT (-o ${options:-defaults}); log: $SCRATCH/cache/mount.log" >&2
}
