"""Reading the passphrase and the default cache dir (the superblock is tested in
test_codec.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cloudfs import config
from cloudfs.config import default_cachedir, read_passphrase
from cloudfs.errors import UsageError


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDFS_PASSPHRASE", raising=False)
    monkeypatch.setattr(config.sys, "stdin", io.StringIO())  # not a tty


def test_passphrase_file_strips_one_newline(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    for content, expected in (
        (b"secret\n", b"secret"),
        (b"secret", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b"secret\r\n", b"secret"),
        (b" sp ace \n", b" sp ace "),
    ):
        path.write_bytes(content)
        assert read_passphrase(str(path), confirm=True) == expected


def test_passphrase_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        read_passphrase(str(tmp_path / "missing"), confirm=False)
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(UsageError, match="empty"):
        read_passphrase(str(tmp_path / "empty"), confirm=False)


def test_file_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDFS_PASSPHRASE", "from env")
    (tmp_path / "pw").write_bytes(b"from file\n")
    assert read_passphrase(str(tmp_path / "pw"), confirm=False) == b"from file"
    assert read_passphrase(None, confirm=True) == b"from env"
    monkeypatch.setenv("CLOUDFS_PASSPHRASE", "")
    with pytest.raises(UsageError, match="CLOUDFS_PASSPHRASE"):
        read_passphrase(None, confirm=False)


def test_no_tty_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="no terminal.*--passphrase-file.*CLOUDFS_PASSPHRASE"):
        read_passphrase(None, confirm=False)


def test_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.sys, "stdin", FakeTty())
    answers = iter(["pässword", "pässword", "pässword", "typo"])
    monkeypatch.setattr(config.getpass, "getpass", lambda prompt="": next(answers))
    assert read_passphrase(None, confirm=True) == "pässword".encode()
    with pytest.raises(UsageError, match="do not match"):
        read_passphrase(None, confirm=True)
    monkeypatch.setattr(config.getpass, "getpass", lambda prompt="": "")
    with pytest.raises(UsageError, match="empty"):
        read_passphrase(None, confirm=False)


def test_default_cachedir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cachedir("u-1") == tmp_path / ".cache" / "cloudfs" / "u-1"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cachedir("u-1") == tmp_path / "xdg" / "cloudfs" / "u-1"
