"""The mount's log: a reply the kernel no longer waited for is not an error."""

from __future__ import annotations

import io
import logging

from cloudfs.mount.main import _AbandonedReplies


def test_a_refused_reply_with_enoent_is_info_and_others_stay_errors() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("pyfuse3.test-abandoned")
    log.propagate = False
    log.addHandler(handler)
    log.addFilter(_AbandonedReplies())
    try:
        log.error("fuse_release(): fuse_reply_* failed with %s", "No such file or directory")
        log.error("fuse_read(): fuse_reply_* failed with %s", "Invalid argument")
        log.error("something else: %s", "No such file or directory")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("INFO fuse_release(): fuse_reply_* failed with No such file")
    assert lines[1] == "ERROR fuse_read(): fuse_reply_* failed with Invalid argument"
    assert lines[2] == "ERROR something else: No such file or directory"
