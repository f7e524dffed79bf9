"""Peak RSS of a mount's mount.cloudfs and cloudfsd while writing one big file or creating
many small ones (issue 7's memory figures): VmRSS sampled every 0.25 s, and VmHWM.

    python tests/stress/peak_rss.py MNT CACHEDIR big 10240      # a 10 GiB file, 1 MiB writes
    python tests/stress/peak_rss.py MNT CACHEDIR many 100000    # 100,000 files of 4 KiB

Both end with fsync or close and `cloudfs flush` (until nothing waits for upload)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MiB = 1 << 20


def status_mib(pid: int, field: str) -> int:
    """A /proc/PID/status field (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


def write_big(mnt: Path, mib: int) -> None:
    """`mib` MiB of incompressible, never repeating data (AES-CTR keystream)."""
    keystream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(MiB)
    fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, keystream.update(zeros))
        os.fsync(fd)
    finally:
        os.close(fd)


def create_many(mnt: Path, count: int) -> None:
    """`count` files of 4 KiB, each with its own first 8 bytes."""
    where = mnt / "many"
    where.mkdir(exist_ok=True)
    body = os.urandom(4096)
    for i in range(count):
        fd = os.open(where / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, i.to_bytes(8, "little") + body[8:])
        finally:
            os.close(fd)


def main() -> None:
    mnt, cache, what, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pids = {
        "mount": int(subprocess.check_output(["pgrep", "-f", f"mount.cloudfs .* {mnt}"]).split()[0]),
        "daemon": int((cache / "daemon.pid").read_text().split()[0]),
    }
    peak = dict.fromkeys(pids, 0)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            for name, pid in pids.items():
                peak[name] = max(peak[name], status_mib(pid, "VmRSS"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        (write_big if what == "big" else create_many)(mnt, n)
        written = time.monotonic() - started
        cloudfs = Path(sys.executable).parent / "cloudfs"
        subprocess.run([str(cloudfs), "flush", str(mnt)], check=True)
        stored = time.monotonic() - started
    finally:
        done.set()
        sampler.join()
    hwm = {name: status_mib(pid, "VmHWM") for name, pid in pids.items()}
    print(f"{what} {n}: written in {written:.0f} s, stored in {stored:.0f} s; peak RSS sampled: "
          f"mount {peak['mount']} MiB, daemon {peak['daemon']} MiB; VmHWM: mount "
          f"{hwm['mount']} MiB, daemon {hwm['daemon']} MiB")


if __name__ == "__main__":
    main()
