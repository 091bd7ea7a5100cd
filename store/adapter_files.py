"""Adapter files in the database: what lets a replica on another machine serve what a worker trained.

A promoted adapter's folder (a few files, ~1 MB for a rank-8 LoRA of the embedded model) is written into
the store in the same transaction that registers it (:meth:`AdaptersMixin.commit_adapter` with ``files``),
so an adapter is never serving without its files being readable. Contents are addressed by their sha256
(``adapter_blobs``; a file two versions share is kept once) and checked against it on every read: a replica
never loads bytes that are not what the worker wrote. The store only moves bytes; writing them into a
folder is the runtime's job (:mod:`agent.adapter_cache`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .db import StoreBase
from .errors import StoreError
from .schema import AdapterBlob, AdapterFile

MAX_FILE_NAME = 255


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_files(session: Session, version: int, files: Mapping[str, bytes]) -> None:
    """Record ``files`` (name -> content) as adapter ``version``'s folder, inside the caller's transaction."""
    for name, data in sorted(files.items()):
        if not name or "/" in name or name in (".", "..") or len(name) > MAX_FILE_NAME:
            raise StoreError(f"adapter file name {name!r} is not a plain file name")
        digest = sha256_hex(data)
        if session.get(AdapterBlob, digest) is None:
            session.add(AdapterBlob(sha256=digest, size=len(data), data=data))
            session.flush()
        session.merge(AdapterFile(version=version, name=name, sha256=digest))


def drop_files(session: Session, versions: list[int]) -> None:
    """Forget the files of ``versions``, and the contents no other version still uses."""
    if not versions:
        return
    session.execute(delete(AdapterFile).where(AdapterFile.version.in_(versions)))
    used = select(AdapterFile.sha256)
    session.execute(delete(AdapterBlob).where(AdapterBlob.sha256.not_in(used)))


def has_files(session: Session, version: int) -> bool:
    return session.scalar(select(AdapterFile.name).where(AdapterFile.version == version).limit(1)) is not None


class AdapterFilesMixin(StoreBase):
    """Reading adapter folders back out of the store."""

    def adapter_manifest(self, version: int) -> dict[str, str]:
        """``{file name: sha256}`` of adapter ``version``'s folder; empty when the store holds no files for it
        (trained with ``consolidation.store_adapter_files`` off, or pruned)."""
        with self._read() as session:
            rows = session.execute(select(AdapterFile.name, AdapterFile.sha256).where(AdapterFile.version == version))
            return {name: digest for name, digest in rows}

    def read_adapter_files(self, version: int) -> dict[str, bytes]:
        """Every file of adapter ``version``, each checked against its sha256.

        Raises :class:`StoreError` when the store has no files for it or a content does not match its hash."""
        with self._read() as session:
            rows = session.execute(
                select(AdapterFile.name, AdapterBlob.sha256, AdapterBlob.data)
                .join(AdapterBlob, AdapterBlob.sha256 == AdapterFile.sha256)
                .where(AdapterFile.version == version)
            ).all()
        if not rows:
            raise StoreError(f"the store holds no files for adapter v{version}")
        files = {}
        for name, digest, data in rows:
            data = bytes(data)
            if sha256_hex(data) != digest:
                raise StoreError(f"adapter v{version}'s file {name} does not match its sha256 in the store: "
                                 "the stored copy is damaged")
            files[name] = data
        return files
