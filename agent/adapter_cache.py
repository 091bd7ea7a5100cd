"""The adapter folders this machine loads from: its own ``adapters_dir``, filled from the store.

A worker writes each promoted adapter's files into the store (``consolidation.store_adapter_files``); any
process about to load adapter ``vN`` calls :func:`local_folder`, which returns ``<adapters_dir>/vN`` once
that folder holds exactly the stored files (checked by sha256), fetching them first when it does not. So a
replica on another machine, with its own ``adapters_dir`` and only the database in common, serves what the
worker trained; on the machine that trained it the folder is already there and nothing is copied. An
adapter the store has no files for (trained with the option off) is loaded from its recorded path: the
shared-folder set-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from store import Adapter, Store

logger = logging.getLogger(__name__)

FETCH_PREFIX = ".fetch-"
"""Folders being filled from the store; never the consolidation's ``.tmp-`` ones, which its cleanup removes."""


def folder_files(folder: Path) -> dict[str, bytes]:
    """The plain files of an adapter folder, by name (what :func:`local_folder` writes back)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _matches(folder: Path, manifest: dict[str, str]) -> bool:
    try:
        return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                   for name, digest in manifest.items())
    except OSError:
        return False


def local_folder(store: Store, row: Adapter, root: Path) -> str:
    """The folder to load adapter ``row`` from here, fetched from the store into ``root`` when needed."""
    manifest = store.adapter_manifest(row.version)
    if not manifest:
        return row.path  # no copy in the store: the recorded folder (shared, or this machine's)
    folder = root / f"v{row.version}"
    if _matches(folder, manifest):
        return str(folder)
    files = store.read_adapter_files(row.version)  # checked against their sha256
    root.mkdir(parents=True, exist_ok=True)
    fetching = root / f"{FETCH_PREFIX}v{row.version}-{uuid.uuid4().hex[:6]}"
    fetching.mkdir()
    try:
        for name, data in files.items():
            (fetching / name).write_bytes(data)
        if folder.exists():
            logger.warning("adapter folder %s does not hold what the store has for v%d: replacing it",
                           folder, row.version)
            shutil.rmtree(folder)
        os.replace(fetching, folder)
    except OSError:
        if not _matches(folder, manifest):  # another process on this machine may have fetched it meanwhile
            raise
    finally:
        shutil.rmtree(fetching, ignore_errors=True)
    logger.info("fetched adapter v%d from the store into %s (%d files)", row.version, folder, len(files))
    return str(folder)
