"""The distillation buffer: training examples waiting for, used by, or kept out of consolidation.

Deduplication: one row per (normalised input, tag). Asking the same question again does not add a second
example; the first accepted answer stays. The one exception is a ``rejected`` row: a later accepted
(``pending``) answer replaces it in place, because rejection was a verdict on that answer, not on the question.

Import/export is JSONL, one example per line. Imports accept the export format and plain
``{"input": ..., "target": ...}`` lines (``answer`` is a synonym of ``target``); every line is validated
before anything is written, and one malformed line means nothing is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from contextlib import nullcontext
from datetime import datetime
from typing import IO, Any, Iterable, Optional, Sequence, Union

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import StoreBase, chunks
from .errors import ImportValidationError, StoreError
from .schema import MAX_SOURCE_LENGTH, Example, ExampleKind, ExampleStatus, utcnow

logger = logging.getLogger(__name__)

StatusFilter = Union[None, str, Sequence[str]]
PathOrFile = Union[str, "os.PathLike[str]", IO[str]]

_EXPORT_FIELDS = (
    "id", "input", "target", "method", "votes", "agreement", "status", "kind", "tag",
    "interaction_id", "adapter_version", "created_at", "updated_at", "source",
)  # fmt: skip


def normalise_input(text: str) -> str:
    """Lowercase with runs of whitespace collapsed: two inputs that differ only so are one question."""
    return " ".join(text.lower().split())


def dedup_key(text: str, tag: Optional[str]) -> str:
    """The unique key of an example: a SHA-256 of its normalised input and tag (fixed length, indexable)."""
    return hashlib.sha256(f"{normalise_input(text)}\x1f{tag or ''}".encode("utf-8")).hexdigest()


def _choice(value: Any, allowed: type[ExampleStatus] | type[ExampleKind], what: str) -> str:
    try:
        return allowed(value).value
    except ValueError:
        raise StoreError(f"{what} must be one of {[v.value for v in allowed]}, not {value!r}") from None


def _statuses(status: StatusFilter) -> Optional[list[str]]:
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    return [_choice(v, ExampleStatus, "status") for v in values]


def _add_in_session(
    session: Session,
    *,
    input: str,
    target: str,
    method: Optional[str],
    votes: Optional[dict[str, Any]],
    agreement: Optional[float],
    status: str,
    kind: str,
    tag: Optional[str],
    interaction_id: Optional[int],
    source: Optional[str] = None,
) -> tuple[Example, bool]:
    key = dedup_key(input, tag)
    existing = session.scalar(select(Example).where(Example.dedup_key == key))
    if existing is None:
        row = Example(
            input=input, target=target, method=method, votes=votes, agreement=agreement, status=status,
            kind=kind, tag=tag, dedup_key=key, interaction_id=interaction_id, source=source,
        )  # fmt: skip
        session.add(row)
        session.flush()
        return row, True
    if existing.status == ExampleStatus.REJECTED and status == ExampleStatus.PENDING:
        existing.input, existing.target, existing.method = input, target, method
        existing.votes, existing.agreement, existing.status = votes, agreement, status
        existing.kind, existing.interaction_id, existing.adapter_version = kind, interaction_id, None
        existing.source = source  # the answer, and so who taught it, is the new one
        existing.updated_at = utcnow()
        session.flush()
        return existing, True
    return existing, False


def _validate_line(number: int, line: str) -> tuple[Optional[dict[str, Any]], list[str]]:
    """Parse one import line into ``add`` arguments, or say everything that is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    problems: list[str] = []
    text = record.get("input")
    if not isinstance(text, str) or not text.strip():
        problems.append("'input' must be a non-empty string" if "input" in record else "missing 'input'")
    target, answer = record.get("target"), record.get("answer")
    if target is None and answer is not None:
        target = answer
    elif target is not None and answer is not None and target != answer:
        problems.append("'target' and 'answer' are both given and differ")
    if target is None:
        problems.append("missing 'target' (or 'answer')")
    elif not isinstance(target, str) or not target.strip():
        problems.append("'target' must be a non-empty string")
    for name in ("method", "tag", "source"):
        if record.get(name) is not None and not isinstance(record[name], str):
            problems.append(f"'{name}' must be a string or null")
    if isinstance(record.get("source"), str) and not 0 < len(record["source"]) <= MAX_SOURCE_LENGTH:
        problems.append(f"'source' must be 1 to {MAX_SOURCE_LENGTH} characters")
    if record.get("votes") is not None and not isinstance(record["votes"], dict):
        problems.append("'votes' must be an object or null")
    agreement = record.get("agreement")
    if agreement is not None and (isinstance(agreement, bool) or not isinstance(agreement, (int, float))):
        problems.append("'agreement' must be a number or null")
    status = record.get("status") or ExampleStatus.PENDING.value
    if status not in tuple(ExampleStatus):
        problems.append(f"'status' must be one of {[s.value for s in ExampleStatus]}, not {status!r}")
    if problems:
        return None, problems
    return {
        "input": text,
        "target": target,
        "method": record.get("method"),
        "votes": record.get("votes"),
        "agreement": None if agreement is None else float(agreement),
        "status": status,
        "kind": ExampleKind.IMPORT.value,
        "tag": record.get("tag"),
        "interaction_id": None,  # ids do not carry over between databases
        "source": record.get("source"),  # kept: an export re-imported must not launder who taught it
    }, []


def _open(fp: PathOrFile, mode: str) -> Any:
    if isinstance(fp, (str, os.PathLike)):
        try:
            return open(fp, mode, encoding="utf-8")
        except OSError as exc:
            raise StoreError(f"cannot {'read' if 'r' in mode else 'write'} {os.fspath(fp)}: {exc.strerror or exc}") from None
    return nullcontext(fp)


class BufferMixin(StoreBase):
    """Adding, listing, sampling, marking, pruning, exporting and importing training examples."""

    def add_example(
        self,
        input: str,
        target: str,
        method: Optional[str],
        votes: Optional[dict[str, Any]] = None,
        agreement: Optional[float] = None,
        status: str = ExampleStatus.PENDING.value,
        kind: str = ExampleKind.SYSTEM2.value,
        tag: Optional[str] = None,
        interaction_id: Optional[int] = None,
        source: Optional[str] = None,
    ) -> tuple[Example, bool]:
        """Add one example unless its question is already in the buffer; returns ``(row, created)``.

        An existing row comes back unchanged with ``created=False``, except a ``rejected`` one, which a new
        ``pending`` example replaces in place (``created=True``). ``source`` names who taught it (an API
        key's name, ``local``...; never a secret): per-source caps and ``purge_source`` read it.
        """
        if not isinstance(input, str) or not input.strip():
            raise StoreError("add_example: 'input' must be a non-empty string")
        if not isinstance(target, str) or not target.strip():
            raise StoreError("add_example: 'target' must be a non-empty string")
        fields: dict[str, Any] = dict(
            input=input, target=target, method=method, votes=votes, agreement=agreement,
            status=_choice(status, ExampleStatus, "status"), kind=_choice(kind, ExampleKind, "kind"),
            tag=tag, interaction_id=interaction_id, source=source,
        )  # fmt: skip
        for attempt in range(3):
            try:
                with self._write() as session:
                    return _add_in_session(session, **fields)
            except IntegrityError:
                # Another process inserted the same question between our read and our insert (possible on
                # PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers): read it again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get_example(self, example_id: int) -> Optional[Example]:
        """One example by id, or None."""
        with self._read() as session:
            return session.get(Example, example_id)

    def _filtered(
        self,
        query: Select[Any],
        status: StatusFilter = None,
        method: Optional[str] = None,
        kind: Optional[str] = None,
        tag: Optional[str] = None,
        since: Optional[datetime] = None,
        source: Optional[str] = None,
    ) -> Select[Any]:
        statuses = _statuses(status)
        if statuses is not None:
            query = query.where(Example.status.in_(statuses))
        if method is not None:
            query = query.where(Example.method == method)
        if kind is not None:
            query = query.where(Example.kind == _choice(kind, ExampleKind, "kind"))
        if tag is not None:
            query = query.where(Example.tag == tag)
        if since is not None:
            query = query.where(Example.created_at >= since)
        if source is not None:
            query = query.where(Example.source == source)
        return query

    def list_examples(
        self,
        status: StatusFilter = None,
        method: Optional[str] = None,
        kind: Optional[str] = None,
        tag: Optional[str] = None,
        limit: Optional[int] = None,
        since: Optional[datetime] = None,
        order: str = "asc",
        source: Optional[str] = None,
    ) -> list[Example]:
        """Examples matching every filter given (``status`` may be one or a list), by creation time."""
        if order not in ("asc", "desc"):
            raise StoreError(f"order must be 'asc' or 'desc', not {order!r}")
        query = self._filtered(select(Example), status, method, kind, tag, since, source)
        if order == "asc":
            query = query.order_by(Example.created_at, Example.id)
        else:
            query = query.order_by(Example.created_at.desc(), Example.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def count_examples(self, status: StatusFilter = None, tag: Optional[str] = None) -> int:
        """How many examples have one of these statuses (all when None), optionally for one tag."""
        query = self._filtered(select(func.count()).select_from(Example), status, tag=tag)
        with self._read() as session:
            return int(session.scalar(query) or 0)

    def set_example_status(
        self, ids: Union[int, Iterable[int]], status: str, adapter_version: Optional[int] = None
    ) -> None:
        """Move examples to ``status`` in one transaction; ``adapter_version`` records who trained on them."""
        id_list = [ids] if isinstance(ids, int) else list(ids)
        values: dict[str, Any] = {"status": _choice(status, ExampleStatus, "status"), "updated_at": utcnow()}
        if adapter_version is not None:
            values["adapter_version"] = adapter_version
        with self._write() as session:
            changed = 0
            for part in chunks(id_list):
                result = session.execute(update(Example).where(Example.id.in_(part)).values(**values))
                changed += result.rowcount or 0  # type: ignore[attr-defined]
        if changed != len(set(id_list)):
            logger.warning("set_example_status: %d of %d ids exist", changed, len(set(id_list)))

    def sample_examples(self, status: StatusFilter, limit: int, seed: int = 0, tag: Optional[str] = None) -> list[Example]:
        """A uniform random sample (deterministic for a seed) of examples with ``status``: replay data."""
        if limit <= 0:
            return []
        with self._read() as session:
            ids = list(session.scalars(self._filtered(select(Example.id), status, tag=tag).order_by(Example.id)))
            chosen = random.Random(seed).sample(ids, min(limit, len(ids)))
            rows = {
                row.id: row for part in chunks(chosen) for row in session.scalars(select(Example).where(Example.id.in_(part)))
            }
        return [rows[i] for i in chosen]

    def prune_examples(self, status: StatusFilter, older_than: Optional[datetime] = None) -> int:
        """Delete examples with ``status`` created before ``older_than`` (all of them when None); returns how many."""
        statuses = _statuses(status)
        if not statuses:
            raise StoreError("prune_examples: name the status(es) to prune")
        query = delete(Example).where(Example.status.in_(statuses))
        if older_than is not None:
            query = query.where(Example.created_at < older_than)
        with self._write() as session:
            deleted = int(session.execute(query).rowcount or 0)  # type: ignore[attr-defined]
        logger.info("pruned %d %s example(s)", deleted, "/".join(statuses))
        return deleted

    def export_examples(self, fp: PathOrFile, status: StatusFilter = None) -> int:
        """Write examples as JSONL (one object per line, every field, times in ISO 8601); returns how many."""
        query = self._filtered(select(Example), status).order_by(Example.id).execution_options(yield_per=1000)
        n = 0
        with self._read() as session, _open(fp, "w") as out:
            for row in session.scalars(query):
                record = {name: getattr(row, name) for name in _EXPORT_FIELDS}
                record["created_at"] = row.created_at.isoformat()
                record["updated_at"] = row.updated_at.isoformat()
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        return n

    def import_examples(self, fp: PathOrFile, source: Optional[str] = None) -> int:
        """Import JSONL examples all-or-nothing; returns how many rows were added (duplicates are skipped).

        Raises :class:`ImportValidationError` naming every malformed line, having imported nothing.
        Imported rows get ``kind='import'`` and ``status='pending'`` unless the line gives a status, and the
        line's ``source`` (an export keeps who taught each example), else ``source``.
        """
        origin = os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else str(getattr(fp, "name", "<import>"))
        records: list[dict[str, Any]] = []
        errors: list[tuple[int, str]] = []
        with _open(fp, "r") as src:
            for number, line in enumerate(src, start=1):
                if not line.strip():
                    continue
                record, problems = _validate_line(number, line)
                if record is None:
                    errors.append((number, "; ".join(problems)))
                else:
                    record["source"] = record["source"] or source
                    records.append(record)
        if errors:
            raise ImportValidationError(origin, errors)
        added = 0
        with self._write() as session:
            for record in records:
                _, created = _add_in_session(session, **record)
                added += created
        logger.info("imported %d example(s) from %s, skipped %d duplicate(s)", added, origin, len(records) - added)
        return added
