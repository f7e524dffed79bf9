#!/usr/bin/env bash
# Install cloudfs for the current user on a Debian machine and mount a demo filesystem.
#
#   bash tools/install.sh
#
# 1. the apt packages cloudfs needs to build and run (only the missing ones);
# 2. .venv in the repository (python3 -m venv) with `pip install -e .`, and links to
#    its commands in ~/.local/bin;
# 3. a demo filesystem on the embedded default (local store, SQLite metadata):
#    store    ~/.local/share/cloudfs-demo/store
#    key      ~/.config/cloudfs/demo.passphrase (generated, mode 600)
#    mounted  ~/cloudfs
# Running it again changes nothing that is already in place: the filesystem is made
# once, and a mounted ~/cloudfs stays as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# --- apt packages ----------------------------------------------------------------------
packages=(fuse3 libfuse3-dev pkg-config libzstd-dev libssl-dev python3-venv build-essential)
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
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}"
fi

# --- virtualenv, the package, the commands ------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $(command -v python3) ($(python3 --version 2>&1))"
    python3 -m venv .venv
fi
log "pip install -e ."
.venv/bin/python -m pip install -q -e .
mkdir -p "$HOME/.local/bin"
for cmd in mkfs.cloudfs mount.cloudfs cloudfs cloudfsd fsck.cloudfs; do
    if [ -x ".venv/bin/$cmd" ]; then
        ln -sfn "$repo/.venv/bin/$cmd" "$HOME/.local/bin/$cmd"
    fi
done
bin="$repo/.venv/bin"

# --- the demo filesystem ---------------------------------------------------------------------
store="$HOME/.local/share/cloudfs-demo/store"
passfile="$HOME/.config/cloudfs/demo.passphrase"
mnt="$HOME/cloudfs"

if [ ! -e "$store/superblock" ]; then
    if [ ! -s "$passfile" ]; then
        log "generating a passphrase in $passfile"
        mkdir -p "$(dirname "$passfile")"
        chmod 700 "$(dirname "$passfile")"
        (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '\n=' > "$passfile" && echo >> "$passfile")
    fi
    chmod 600 "$passfile"
    mkdir -p "$store"
    log "creating the demo filesystem in $store"
    "$bin/mkfs.cloudfs" "local://$store" --passphrase-file "$passfile"
elif [ ! -s "$passfile" ]; then
    die "$store holds a filesystem but its passphrase file $passfile is missing"
fi

if mountpoint -q "$mnt" 2>/dev/null; then
    log "$mnt is already mounted"
else
    mkdir -p "$mnt"
    log "mounting the demo filesystem on $mnt"
    "$bin/mount.cloudfs" "local://$store" "$mnt" --passphrase-file "$passfile"
fi

cat <<DONE

cloudfs is installed and the demo filesystem is mounted on $mnt.
  commands:   $HOME/.local/bin (mkfs.cloudfs, mount.cloudfs, cloudfs, ...)
  status:     cloudfs stat $mnt
  unmount:    fusermount3 -u $mnt
  mount again: mount.cloudfs local://$store $mnt --passphrase-file $passfile
DONE
