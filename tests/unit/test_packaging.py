"""The wheel: one top-level package (`cloudfs`) holding the native extension and
the mapped folders (mount, daemon, tools), and installable on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What setup.py needs; copied so the build neither writes into the working tree
# nor races another build there (build/, native/_native.cpp).
SOURCES = ["setup.py", "pyproject.toml", "cloudfs", "mount", "daemon", "tools", "native"]
BUILD_OUTPUTS = shutil.ignore_patterns("*.so", "_native.cpp", "__pycache__", "*.egg-info", "build")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=BUILD_OUTPUTS, symlinks=True)
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    out = root / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        timeout=110,
    )
    (whl,) = out.glob("cloudfs-*.whl")
    return whl


@pytest.mark.packaging
@pytest.mark.timeout(120)
def test_wheel_has_only_the_cloudfs_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"cloudfs"}
    assert any(n.startswith("cloudfs/_native") and n.endswith(".so") for n in names)
    for package in ["mount", "daemon", "tools", "codec", "objectstore", "meta", "fsck"]:
        assert f"cloudfs/{package}/__init__.py" in names, package
    assert "cloudfs/_native.pyi" in names
    assert "cloudfs/py.typed" in names
    assert not any(n.endswith((".pyx", ".cpp", ".hpp")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in [
        "mkfs.cloudfs = cloudfs.tools.mkfs:main",
        "mount.cloudfs = cloudfs.mount.main:main",
        "cloudfsd = cloudfs.daemon.main:main",
        "cloudfs = cloudfs.tools.cloudfs:main",
        "fsck.cloudfs = cloudfs.tools.fsck:main",
    ]:
        assert line in scripts


@pytest.mark.packaging
@pytest.mark.timeout(120)
def test_installed_wheel_imports_without_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=60,
    )
    assert {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} <= {
        "cloudfs",
        "bin",
    }
    # The target dir comes first on sys.path (the editable install's finder sits
    # after the path finder), and the asserts check the modules came from there.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import cloudfs._native as n, cloudfs.mount, cloudfs.daemon, cloudfs.tools; "
        "assert n.__file__.startswith(sys.argv[1]), n.__file__; "
        "assert cloudfs.mount.__file__.startswith(sys.argv[1]); "
        "assert n.decompress(n.compress(b'a' * 100), 100) == b'a' * 100; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(target)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "ok"
