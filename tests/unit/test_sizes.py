"""Sizes on command lines (--cache-size): binary units, one clear error otherwise."""

from __future__ import annotations

import pytest
from cloudfs.tools._cli import parse_size

from cloudfs.errors import UsageError

MiB = 1 << 20
GiB = 1 << 30


def test_units() -> None:
    assert parse_size("10G") == parse_size("10GiB") == 10 * GiB
    assert parse_size("256M") == parse_size("256MiB") == parse_size("256mb") == 256 * MiB
    assert parse_size("1.5k") == 1536
    assert parse_size("4096") == parse_size("4096B") == 4096
    assert parse_size(" 2T ") == 2 << 40


@pytest.mark.parametrize("bad", ["", "G", "-1M", "0", "ten", "5X", "nanM", "infG"])
def test_bad_sizes(bad: str) -> None:
    with pytest.raises(UsageError, match="cache size"):
        parse_size(bad, "cache size")
