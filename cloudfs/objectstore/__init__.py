"""Object stores: the `ObjectStore` interface (`base`), its backends (`local`, later
`s3`), the wrappers around any store (`retry`, `prefix`, `sealed`), and `open_store`,
which turns a storage URL into a store.

Backends are chosen by URL scheme. Each backend module provides
``from_url(url: str, **opts) -> ObjectStore`` and is imported only when its scheme is
used (so a local filesystem never imports boto3); a new backend is one entry in
`SCHEMES`.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from cloudfs.errors import BadStorageURL
from cloudfs.objectstore.base import ObjectInfo, ObjectStore, check_key

__all__ = ["SCHEMES", "ObjectInfo", "ObjectStore", "check_key", "open_store"]

#: URL scheme → module that implements it (with a `from_url` function)
SCHEMES: dict[str, str] = {
    "local": "cloudfs.objectstore.local",
    "s3": "cloudfs.objectstore.s3",
}

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(url: str, **opts: Any) -> ObjectStore:
    """The store a storage URL names: "local:///abs/path", a plain path ("/abs/path",
    "relative/path", made absolute now), or "<scheme>://..." of a backend in SCHEMES.
    BadStorageURL for anything else. The store is not wrapped (no RetryStore)."""
    if not url:
        raise BadStorageURL("empty storage URL")
    match = _SCHEME_RE.match(url)
    if match is None:
        from cloudfs.objectstore.local import LocalStore

        if opts:
            raise BadStorageURL(f"{url}: unknown options {', '.join(sorted(opts))}")
        return LocalStore(Path(url).expanduser().absolute())
    scheme = match.group(1).lower()
    module_name = SCHEMES.get(scheme)
    if module_name is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise BadStorageURL(f"{url}: unknown scheme {scheme}:// (known: {known}, or a path)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BadStorageURL(f"{url}: {scheme}:// storage is not available yet") from None
        raise BadStorageURL(f"{url}: {scheme}:// storage needs the {exc.name} package") from None
    store: ObjectStore = module.from_url(url, **opts)
    return store
