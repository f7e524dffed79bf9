"""Peak RSS of a mount's mount.cloudfs and cloudfsd while writing one big file or creating
many small ones (issue 7's memory figures): VmRSS sampled every 0.25 s, and VmHWM.

    python tests/stress/peak_rss.py MNT CACHEDIR big 10240      # a 10 GiB file, 1 MiB writes
    python tests/stress/peak_rss.py MNT CACHEDIR many 100000    # 100,000 files of 4 KiB

Both end with fsync/close and `cloudfs flush` (until nothing waits for upload)."""
import os, sys, threading, time, subprocess
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
mnt, cache, what, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def pid_of(name):
    return int(open(os.path.join(cache, name)).read().split()[0])
mount_pid = int(subprocess.check_output(["pgrep", "-f", f"mount.cloudfs .* {mnt}"]).split()[0])
daemon_pid = pid_of("daemon.pid")
peak = {"mount": 0, "daemon": 0}
stop = False
def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
def sample():
    while not stop:
        for k, p in (("mount", mount_pid), ("daemon", daemon_pid)):
            try: peak[k] = max(peak[k], rss(p))
            except Exception: pass
        time.sleep(0.25)
t = threading.Thread(target=sample); t.start()
t0 = time.time()
if what == "big":
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zero = bytes(1 << 20)
    fd = os.open(os.path.join(mnt, "big"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for i in range(n):
        os.write(fd, enc.update(zero))
    os.fsync(fd); os.close(fd)
else:
    d = os.path.join(mnt, "many"); os.makedirs(d, exist_ok=True)
    data = os.urandom(4096)
    for i in range(n):
        fd = os.open(f"{d}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, i.to_bytes(8, "little") + data[8:]); os.close(fd)
dt = time.time() - t0
subprocess.run([os.path.join(os.path.dirname(sys.executable), "cloudfs"), "flush", mnt], check=True)
dt2 = time.time() - t0
stop = True; t.join()
hwm = {}
for k, p in (("mount", mount_pid), ("daemon", daemon_pid)):
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmHWM:"): hwm[k] = int(line.split()[1]) // 1024
print(f"{what} n={n}: written in {dt:.0f} s, stored in {dt2:.0f} s; peak RSS sampled mount {peak['mount']} MiB daemon {peak['daemon']} MiB; VmHWM mount {hwm['mount']} MiB daemon {hwm['daemon']} MiB")
