"""Sources: who sent each interaction and taught each example, and taking back what one source taught.

A source is a name the runtime gives the sender (an API key's name, ``local`` for in-process calls; never a
secret). When a source turns out to have taught wrong things, :meth:`SourcesMixin.purge_source` deletes
every example it taught and flags the adapters that learned from them (``adapters.needs_retrain``), so the
operator knows which versions to roll back from or retrain. Interactions are kept: they are the audit log
of what was asked and answered, and nothing trains on their answers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from .db import StoreBase, chunks
from .errors import StoreError
from .schema import Adapter, ConsolidationRun, Example

logger = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    """What :meth:`SourcesMixin.purge_source` removed and flagged."""

    source: str
    examples: int = 0
    """Examples deleted."""
    by_status: dict[str, int] = field(default_factory=dict)
    """The deleted examples by the status they had (pending, used, holdout, rejected)."""
    adapters: list[int] = field(default_factory=list)
    """Versions now flagged ``needs_retrain``: they trained on the source's examples, may have replayed them,
    or started from the weights of one that did."""
    serving: list[int] = field(default_factory=list)
    """Those of ``adapters`` that serve now."""


def _run_config(session: Session, run_id: int | None) -> dict[str, Any]:
    run = session.get(ConsolidationRun, run_id) if run_id is not None else None
    return (run.config or {}) if run is not None else {}


def tainted_adapters(session: Session, used: list[tuple[str | None, int]]) -> set[int]:
    """The adapter versions that learned from examples ``used`` as ``(tag, trained by version)`` pairs.

    - the versions that trained on them (``examples.adapter_version``);
    - later versions that may have replayed them: a consolidation mixes earlier ``used`` examples of its
      scope back in (the general adapter's replay draws from every scope), unless its run's config had
      ``replay_ratio`` 0;
    - versions whose run started from the weights of a flagged one (``resume``), transitively.
    A version whose run is unknown is assumed to have replayed and resumed: the flag errs on the safe side.
    """
    direct = {version for _, version in used}
    if not direct:
        return set()
    first_by_tag: dict[str | None, int] = {}
    for tag, version in used:
        first_by_tag[tag] = min(version, first_by_tag.get(tag, version))
    first_any = min(first_by_tag.values())
    flagged = set(direct)
    rows = session.scalars(select(Adapter).order_by(Adapter.version)).all()
    for row in rows:  # in version order: a parent is decided before its children
        if row.version in flagged:
            continue
        config = _run_config(session, row.run_id)
        replays = config.get("replay_ratio", 1) != 0
        first = first_any if row.scope is None else first_by_tag.get(row.scope)
        replayed = replays and first is not None and row.version > first
        if replayed or (config.get("resume", True) and row.parent in flagged):
            flagged.add(row.version)
    return flagged


class SourcesMixin(StoreBase):
    """Counting examples by source, and purging one source."""

    def example_sources(self) -> dict[str | None, dict[str, int]]:
        """Examples per source (None: recorded before sources were), by status."""
        out: dict[str | None, dict[str, int]] = defaultdict(dict)
        with self._read() as session:
            for source, status, n in session.execute(
                select(Example.source, Example.status, func.count()).group_by(Example.source, Example.status)
            ):
                out[source][status] = int(n)
        return dict(out)

    def purge_source(self, source: str, dry_run: bool = False) -> PurgeReport:
        """Delete every example ``source`` taught (whatever its status) and flag the adapters that learned
        from them ``needs_retrain``, in one transaction; with ``dry_run`` only say what would happen."""
        if not isinstance(source, str) or not source.strip():
            raise StoreError("purge_source: name the source to purge")
        if dry_run:
            with self._read() as session:
                return _purge_plan(session, source)[0]
        with self._write() as session:
            report, ids = _purge_plan(session, source)
            for part in chunks(ids):
                session.execute(delete(Example).where(Example.id.in_(part)))
            for part in chunks(report.adapters):
                session.execute(update(Adapter).where(Adapter.version.in_(part)).values(needs_retrain=True))
        logger.warning("purged source %r: %d example(s) %s deleted; adapters flagged for retraining: %s", source,
                       report.examples, report.by_status, ", ".join(f"v{v}" for v in report.adapters) or "none")
        return report


def _purge_plan(session: Session, source: str) -> tuple[PurgeReport, list[int]]:
    """What purging ``source`` deletes (example ids) and flags (in the report), read in ``session``."""
    report = PurgeReport(source)
    rows = session.execute(
        select(Example.id, Example.status, Example.tag, Example.adapter_version).where(Example.source == source)
    ).all()
    for _, status, _, _ in rows:
        report.by_status[status] = report.by_status.get(status, 0) + 1
    report.examples = len(rows)
    report.adapters = sorted(tainted_adapters(session, [(tag, v) for _, _, tag, v in rows if v is not None]))
    if report.adapters:
        report.serving = sorted(session.scalars(
            select(Adapter.version).where(Adapter.version.in_(report.adapters), Adapter.serving.is_(True))))
    return report, [row[0] for row in rows]
