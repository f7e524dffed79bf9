"""The filesystem's secrets: passphrase key derivation (Argon2id, scrypt as fallback),
wrapping of the master key with AES-256-GCM, and the HKDF subkeys derived from it.

Key hierarchy::

    passphrase --KDF(params, salt)--> wrapping key --AES-GCM(aad = fs uuid)--> master key
    master key --HKDF-SHA256(info)--> data key (AES-GCM of blocks)
                                      id key   (HMAC-SHA256 block ids)
                                      gear key (FastCDC gear table)

Only the wrapped master key and the KDF parameters are stored (in the superblock), so
changing the passphrase rewrites the superblock and nothing else.

Tests set the environment variable ``CLOUDFS_TEST_FAST_KDF=1`` (or the module-level
``FAST_KDF``) so new filesystems get the cheapest KDF parameters; never use it for a
real filesystem: the parameters are stored in the superblock and stay that weak.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cloudfs.errors import CorruptObject, UnsupportedFormat, WrongPassphrase

log = logging.getLogger(__name__)

KEY_SIZE = 32
NONCE_SIZE = 12
SALT_SIZE = 16
TAG_SIZE = 16

#: Cheap KDF parameters for new filesystems (tests only). The environment variable
#: CLOUDFS_TEST_FAST_KDF=1 has the same effect; it is read at each call so a test can
#: set it with monkeypatch.
FAST_KDF = False

# Argon2id cost (RFC 9106 second recommended option, scaled to 64 MiB).
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
# scrypt cost of about the same memory (128 * n * r bytes = 64 MiB).
SCRYPT_N = 2**16
SCRYPT_R = 8
SCRYPT_P = 1

# Upper bounds accepted from a stored superblock, so a damaged or hostile one cannot
# make unlock allocate unbounded memory or spin forever.
_MAX_MEMORY_KIB = 4 * 1024 * 1024
_MAX_ITERATIONS = 1000
_MAX_LANES = 64
_MAX_SCRYPT_N = 2**22

# HKDF info strings: distinct per subkey and versioned, so a later subkey can never
# equal an existing one.
_INFO_DATA = b"cloudfs v1 data key (AES-256-GCM of blocks)"
_INFO_ID = b"cloudfs v1 id key (HMAC-SHA256 block ids)"
_INFO_GEAR = b"cloudfs v1 gear key (FastCDC gear table)"


def fast_kdf() -> bool:
    """True when tests asked for cheap KDF parameters."""
    return FAST_KDF or os.environ.get("CLOUDFS_TEST_FAST_KDF") == "1"


@functools.cache
def argon2id_available() -> bool:
    """True when this `cryptography` build (>= 44, OpenSSL >= 3.2) provides Argon2id."""
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        Argon2id(salt=b"\0" * 8, length=4, iterations=1, lanes=1, memory_cost=8).derive(b"x")
    except (ImportError, UnsupportedAlgorithm):
        return False
    return True


@dataclass
class KdfParams:
    """How the wrapping key is derived from the passphrase. Argon2id uses
    memory_kib/iterations/lanes; scrypt uses n/r/p; the other fields stay 0."""

    algo: str  # "argon2id" | "scrypt"
    salt: bytes
    memory_kib: int = 0
    iterations: int = 0
    lanes: int = 0
    n: int = 0
    r: int = 0
    p: int = 0

    @classmethod
    def new(cls, algo: str | None = None) -> KdfParams:
        """Parameters for a new filesystem: a random salt, Argon2id when available
        (else scrypt), production cost unless `fast_kdf()`."""
        if algo is None:
            algo = "argon2id" if argon2id_available() else "scrypt"
        salt = os.urandom(SALT_SIZE)
        fast = fast_kdf()
        if fast:
            log.warning("using cheap test KDF parameters (CLOUDFS_TEST_FAST_KDF)")
        if algo == "argon2id":
            if fast:
                return cls(algo, salt, memory_kib=8, iterations=1, lanes=1)
            return cls(
                algo,
                salt,
                memory_kib=ARGON2_MEMORY_KIB,
                iterations=ARGON2_ITERATIONS,
                lanes=ARGON2_LANES,
            )
        if algo == "scrypt":
            if fast:
                return cls(algo, salt, n=2**4, r=8, p=1)
            return cls(algo, salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        raise ValueError(f"unknown KDF {algo!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON object (dict) for the superblock; the salt is hex."""
        obj: dict[str, Any] = {"algo": self.algo, "salt": self.salt.hex()}
        if self.algo == "argon2id":
            obj.update(memory_kib=self.memory_kib, iterations=self.iterations, lanes=self.lanes)
        else:
            obj.update(n=self.n, r=self.r, p=self.p)
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> KdfParams:
        """Parse `to_json` output. UnsupportedFormat for a KDF this version does not
        know; ValueError (TypeError) for malformed or out-of-range parameters."""
        if not isinstance(obj, dict):
            raise TypeError("KDF parameters are not an object")
        algo = obj.get("algo")
        try:
            salt = bytes.fromhex(obj["salt"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("KDF salt missing or not hex") from None
        if len(salt) < 8:
            raise ValueError("KDF salt shorter than 8 bytes")

        def param(name: str, low: int, high: int) -> int:
            value = obj.get(name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"KDF parameter {name}={value!r} out of range")
            return value

        if algo == "argon2id":
            lanes = param("lanes", 1, _MAX_LANES)
            return cls(
                algo,
                salt,
                memory_kib=param("memory_kib", 8 * lanes, _MAX_MEMORY_KIB),
                iterations=param("iterations", 1, _MAX_ITERATIONS),
                lanes=lanes,
            )
        if algo == "scrypt":
            n = param("n", 2, _MAX_SCRYPT_N)
            if n & (n - 1):
                raise ValueError("scrypt n is not a power of two")
            return cls(algo, salt, n=n, r=param("r", 1, 64), p=param("p", 1, 64))
        raise UnsupportedFormat(f"unknown KDF {algo!r}")


def derive_wrapping_key(passphrase: bytes, params: KdfParams) -> bytes:
    """The 32-byte key that wraps the master key. CPU- and memory-heavy by design:
    async callers run it in a worker thread."""
    if params.algo == "argon2id":
        if not argon2id_available():
            raise UnsupportedFormat(
                "this filesystem's passphrase uses Argon2id, which needs "
                "cryptography >= 44 built with OpenSSL >= 3.2"
            )
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(
            salt=params.salt,
            length=KEY_SIZE,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
        ).derive(passphrase)
    if params.algo == "scrypt":
        return Scrypt(salt=params.salt, length=KEY_SIZE, n=params.n, r=params.r, p=params.p).derive(
            passphrase
        )
    raise UnsupportedFormat(f"unknown KDF {params.algo!r}")


def wrap_key(wrapping_key: bytes, master_key: bytes, aad: bytes) -> bytes:
    """nonce (12) + AES-256-GCM(master key) with `aad` (the fs uuid) as associated data,
    so the wrapped key only opens inside the filesystem it was made for."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(wrapping_key).encrypt(nonce, master_key, aad)


def unwrap_key(wrapping_key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """The master key; WrongPassphrase when the wrapping key (i.e. the passphrase) or
    the aad does not match."""
    if len(wrapped) != NONCE_SIZE + KEY_SIZE + TAG_SIZE:
        raise CorruptObject(f"wrapped key has {len(wrapped)} bytes")
    try:
        return AESGCM(wrapping_key).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], aad)
    except InvalidTag:
        raise WrongPassphrase() from None


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(master)


@dataclass(frozen=True)
class Keys:
    """The working keys of an unlocked filesystem (never printed: repr=False)."""

    data_key: bytes = field(repr=False)
    id_key: bytes = field(repr=False)
    gear_key: bytes = field(repr=False)
    #: which master key sealed a block (u32 in the block header); 0 is the key made by
    #: mkfs. Reserved for key rotation: a later keyring maps ids to keys.
    key_id: int = 0

    @classmethod
    def from_master(cls, master: bytes, key_id: int = 0) -> Keys:
        if len(master) != KEY_SIZE:
            raise ValueError(f"master key must be {KEY_SIZE} bytes")
        if not 0 <= key_id < 2**32:
            raise ValueError("key id must fit in 32 bits")
        return cls(
            data_key=_hkdf(master, _INFO_DATA),
            id_key=_hkdf(master, _INFO_ID),
            gear_key=_hkdf(master, _INFO_GEAR),
            key_id=key_id,
        )
