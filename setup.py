"""Build script: the cloudfs package (folders mapped under one import name) and
its C++ extension cloudfs._native."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = Path("native")


def pkg_config(package: str, fallback_lib: str) -> tuple[list[str], list[str]]:
    """(cflags, libs) of a library from pkg-config, or just -l<fallback_lib> when
    pkg-config or the package's .pc file is missing (default search paths)."""
    if shutil.which("pkg-config") is not None:
        try:
            cflags, libs = (
                subprocess.run(
                    ["pkg-config", what, package], check=True, capture_output=True, text=True
                ).stdout.split()
                for what in ("--cflags", "--libs")
            )
            return cflags, libs
        except subprocess.CalledProcessError:
            pass
    return [], [f"-l{fallback_lib}"]


def native_extension() -> Extension:
    cflags: list[str] = []
    libs: list[str] = []
    for package, lib in (("libzstd", "zstd"), ("libcrypto", "crypto")):
        c, lb = pkg_config(package, lib)
        cflags += c
        libs += lb
    include_dirs = [f[2:] for f in cflags if f.startswith("-I")]
    library_dirs = [f[2:] for f in libs if f.startswith("-L")]
    libraries = [f[2:] for f in libs if f.startswith("-l")]
    # No -march: the wheel must run on any machine of its architecture.  The hot
    # loops either are scalar (the gear hash) or pick SIMD/SHA-NI code at run time
    # inside libcrypto and libzstd, so a baseline target costs them nothing.
    compile_args = ["-std=c++17", "-O3", "-Wall", "-fvisibility=hidden"]
    return Extension(
        "cloudfs._native",
        sources=[
            str(NATIVE / "_native.pyx"),
            *sorted(str(p) for p in (NATIVE / "src").glob("*.cpp")),
        ],
        depends=sorted(str(p) for p in (NATIVE / "src").glob("*.hpp")),
        include_dirs=[str(NATIVE / "src"), *include_dirs],
        library_dirs=library_dirs,
        libraries=libraries,
        language="c++",
        extra_compile_args=compile_args,
    )


setup(
    name="cloudfs",
    version="0.1.0",
    description="A POSIX filesystem in object storage: deduplicated, compressed, encrypted",
    python_requires=">=3.11",
    package_dir={
        "cloudfs": "cloudfs",
        "cloudfs.mount": "mount",
        "cloudfs.daemon": "daemon",
        "cloudfs.tools": "tools",
    },
    # Explicit list: generic names (mount, daemon, tools) must never become
    # top-level packages in site-packages.
    packages=[
        "cloudfs",
        "cloudfs.codec",
        "cloudfs.objectstore",
        "cloudfs.meta",
        "cloudfs.fsck",
        "cloudfs.mount",
        "cloudfs.daemon",
        "cloudfs.tools",
    ],
    package_data={"cloudfs": ["py.typed", "_native.pyi"]},
    ext_modules=cythonize(
        [native_extension()],
        compiler_directives={"language_level": "3"},
    ),
    install_requires=[
        "pyfuse3",
        "trio",
        "boto3",
        "redis",
        "cryptography",
        "zstandard",
        "pymysql",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "moto[server]", "pytest-timeout", "pytest-xdist"],
    },
    entry_points={
        "console_scripts": [
            "mkfs.cloudfs=cloudfs.tools.mkfs:main",
            "mount.cloudfs=cloudfs.mount.main:main",
            "cloudfsd=cloudfs.daemon.main:main",
            "cloudfs=cloudfs.tools.cloudfs:main",
            "fsck.cloudfs=cloudfs.tools.fsck:main",
        ],
    },
    zip_safe=False,
)
