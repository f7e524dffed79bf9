"""cloudfs.malloc: block-sized buffers freed and allocated again reuse memory."""

from __future__ import annotations

import os
import subprocess
import sys

CHURN = """
import resource, sys
from cloudfs import malloc
print(malloc.tune())
def churn():
    for _ in range(50):
        a = bytes(2 << 20)   # a block's buffer, and a second one (a sealed body, say)
        b = a + b"header"
        del a, b
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _churn(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHURN], env={**clean, **env}, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


def test_tuned_buffers_reuse_memory_without_page_faults() -> None:
    tuned, faults = _churn()
    assert tuned == "True"
    # 100 buffers of 2 MiB are 51,200 pages: fresh memory would fault on each
    assert faults < 2000, faults


def test_the_environment_wins() -> None:
    tuned, _ = _churn(MALLOC_ARENA_MAX="2")
    assert tuned == "False"
