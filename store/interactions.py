"""The interaction log: every answered query, and the statistics the CLI and ``/metrics`` show.

Confident System 1 answers from this log are also the retention data for consolidation: replaying what the
model already answered well keeps a new adapter from forgetting it.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from datetime import datetime, timedelta
from typing import Any, Optional, Sequence

from sqlalchemy import func, insert, select

from .db import StoreBase, chunks
from .errors import StoreError
from .schema import Example, Interaction, Route, utcnow
from .buffer import normalise_input

logger = logging.getLogger(__name__)

_INTERACTION_FIELDS = frozenset(c.key for c in Interaction.__table__.columns) - {"id"}
_RETENTION_BUCKETS = 16


def check_interaction(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of one interaction row, validated: ``route`` and ``input`` required, nothing unknown."""
    unknown = set(fields) - _INTERACTION_FIELDS
    if unknown:
        raise StoreError(f"log_interaction: unknown field(s) {sorted(unknown)}; known: {sorted(_INTERACTION_FIELDS)}")
    if not isinstance(fields.get("input"), str):
        raise StoreError("log_interaction: 'input' (a string) is required")
    route = fields.get("route")
    if route not in tuple(Route):
        raise StoreError(f"log_interaction: route must be one of {[r.value for r in Route]}, not {route!r}")
    fields["route"] = Route(route).value
    if fields.get("final_answer") is None:
        fields["final_answer"] = ""
    return fields


class InteractionsMixin(StoreBase):
    """Logging and reading interactions, and :meth:`stats`."""

    def log_interaction(self, **fields: Any) -> int:
        """Record one answered query; returns its id. ``route`` and ``input`` are required."""
        with self._write() as session:
            row = Interaction(**check_interaction(fields))
            session.add(row)
            session.flush()
            return row.id

    def log_interactions(self, rows: Sequence[dict[str, Any]]) -> int:
        """Record many answered queries in one transaction (what :class:`store.writer.InteractionWriter`
        commits per batch); returns how many. Every row is checked first: one bad row writes none."""
        checked = [check_interaction(dict(fields)) for fields in rows]
        by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
        for fields in checked:  # an executemany needs the same columns in every row; unset ones get defaults
            by_columns.setdefault(frozenset(fields), []).append(fields)
        if checked:
            with self._write() as session:  # multi-row INSERTs (executemany), no ORM objects
                for group in by_columns.values():
                    session.execute(insert(Interaction), group)
        return len(checked)

    def add_background_label(self, interaction_id: int, *, method: Optional[str], tokens_system2: int = 0,
                             system2_calls: int = 0, accepted: bool = False, votes: Optional[dict[str, Any]] = None,
                             teacher_prompt_tokens: int = 0, teacher_completion_tokens: int = 0,
                             route_reason: Optional[dict[str, Any]] = None) -> bool:
        """What System 2 spent and decided in the background, added to the interaction whose query it labelled:
        its route stays what the user got (System 1), and its System 2 tokens, calls and teacher tokens count in
        :meth:`stats` like an inline run's. ``route_reason`` keys are merged in. ``method`` None: System 2 did
        not run after all (the label was skipped), and only ``route_reason`` is merged. False: no such
        interaction."""
        with self._write() as session:
            row = session.get(Interaction, interaction_id)
            if row is None:
                return False
            if method is not None:
                row.method, row.accepted, row.votes = method, accepted, votes
                row.tokens_system2 = (row.tokens_system2 or 0) + tokens_system2
                row.system2_calls = (row.system2_calls or 0) + system2_calls
                row.teacher_prompt_tokens = (row.teacher_prompt_tokens or 0) + teacher_prompt_tokens
                row.teacher_completion_tokens = (row.teacher_completion_tokens or 0) + teacher_completion_tokens
            if route_reason:
                row.route_reason = {**(row.route_reason or {}), **route_reason}
            return True

    def list_interactions(
        self, route: Optional[str] = None, limit: Optional[int] = 100, since: Optional[datetime] = None
    ) -> list[Interaction]:
        """The newest interactions first, optionally only one route and only those created at or after ``since``."""
        query = select(Interaction).order_by(Interaction.created_at.desc(), Interaction.id.desc())
        if route is not None:
            query = query.where(Interaction.route == route)
        if since is not None:
            query = query.where(Interaction.created_at >= since)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def get_interaction(self, interaction_id: int) -> Optional[Interaction]:
        """One interaction by id, or None."""
        with self._read() as session:
            return session.get(Interaction, interaction_id)

    def sample_traces(self, interaction_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
        """What each System 2 sample wrote (``route_reason["samples"]``: its answer and trace, e.g. a PAL
        program), per interaction id; ids without samples are left out."""
        traces: dict[int, list[dict[str, Any]]] = {}
        with self._read() as session:
            for part in chunks(sorted(set(interaction_ids))):
                query = select(Interaction.id, Interaction.route_reason).where(Interaction.id.in_(part))
                for interaction_id, reason in session.execute(query):
                    samples = (reason or {}).get("samples")
                    if isinstance(samples, list):
                        traces[interaction_id] = [s for s in samples if isinstance(s, dict)]
        return traces

    def system2_outcomes(self, limit: int) -> list[tuple[str, str, bool]]:
        """The newest ``limit`` System 2 runs that a teaching source asked for, oldest first: (input, the method
        asked for, whether its answer was accepted). The routing memory is rebuilt from these at start; runs
        logged before the method asked for was recorded (``route_reason["asked"]``) are left out."""
        query = (
            select(Interaction.input, Interaction.route_reason, Interaction.accepted)
            .where(Interaction.method.is_not(None))
            .order_by(Interaction.created_at.desc(), Interaction.id.desc())
            .limit(limit)
        )
        with self._read() as session:
            rows = list(session.execute(query))
        outcomes = []
        for text, reason, accepted in reversed(rows):
            reason = reason or {}
            if isinstance(reason.get("asked"), str) and reason.get("teach", True):
                outcomes.append((text, reason["asked"], bool(accepted)))
        return outcomes

    def sample_confident_interactions(self, min_confidence: float, limit: int, seed: int = 0) -> list[Interaction]:
        """Confident System 1 answers for retention replay, spread across the whole history.

        Questions are deduplicated by normalised input (the latest answer to each is kept). The time span from
        the oldest to the newest is cut into equal buckets and the sample is drawn round-robin from them, so a
        burst of recent traffic does not crowd out old skills. Returned oldest first; deterministic for a seed.
        """
        if limit <= 0:
            return []
        query = (
            select(Interaction.id, Interaction.input, Interaction.created_at)
            .where(Interaction.route == Route.SYSTEM1.value)
            .where(Interaction.confidence >= min_confidence)
            .order_by(Interaction.created_at, Interaction.id)
        )
        with self._read() as session:
            latest: dict[str, tuple[int, datetime]] = {}
            for row_id, text, created_at in session.execute(query):
                latest[normalise_input(text)] = (row_id, created_at)
            candidates = sorted(latest.values(), key=lambda item: (item[1], item[0]))
            if not candidates:
                return []
            rng = random.Random(seed)
            chosen = _stratified_sample(candidates, limit, rng)
            rows = [
                row for part in chunks(chosen) for row in session.scalars(select(Interaction).where(Interaction.id.in_(part)))
            ]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

    def stats(self) -> dict[str, Any]:
        """Counts for dashboards: the buffer by status/method/kind and its growth, interactions by route,
        the System 2 rate, acceptance among System 2 answers, tokens spent by each system, and the teacher's
        tokens with the number of accepted answers it wrote (``teacher_accepted``)."""
        now = utcnow()
        first_day = (now - timedelta(days=13)).date()
        with self._read() as session:

            def grouped(column: Any) -> dict[str, int]:
                rows = session.execute(select(column, func.count()).group_by(column))
                return {("none" if key is None else str(key)): int(n) for key, n in rows}

            by_status = grouped(Example.status)
            by_method = grouped(Example.method)
            by_kind = grouped(Example.kind)
            start = datetime.combine(first_day, datetime.min.time(), tzinfo=now.tzinfo)
            recent = session.scalars(select(Example.created_at).where(Example.created_at >= start))
            per_day = Counter(created.date() for created in recent)
            by_route = grouped(Interaction.route)
            totals = session.execute(
                select(
                    func.count(Interaction.id),
                    func.coalesce(func.sum(Interaction.tokens_system1), 0),
                    func.coalesce(func.sum(Interaction.tokens_system2), 0),
                    func.coalesce(func.sum(Interaction.system2_calls), 0),
                    func.coalesce(func.sum(Interaction.teacher_prompt_tokens), 0),
                    func.coalesce(func.sum(Interaction.teacher_completion_tokens), 0),
                )
            ).one()
            taught = session.scalar(  # accepted examples the teacher wrote (inline or in the background)
                select(func.count()).select_from(Interaction).where(
                    Interaction.accepted.is_(True), Interaction.teacher_completion_tokens > 0)
            )
            system2_runs = session.scalar(  # System 2 ran, inline or in the background, whatever the user got
                select(func.count()).select_from(Interaction).where(Interaction.method.is_not(None)))
            accepted = session.scalar(
                select(func.count())
                .select_from(Interaction)
                .where(Interaction.route == Route.SYSTEM2.value, Interaction.accepted.is_(True))
            )
            errors = session.scalar(select(func.count()).select_from(Interaction).where(Interaction.error.is_not(None)))
        n_interactions = int(totals[0])
        n_system2 = by_route.get(Route.SYSTEM2.value, 0)
        days = [first_day + timedelta(days=i) for i in range(14)]
        return {
            "examples": {
                "total": sum(by_status.values()),
                "by_status": by_status,
                "by_method": by_method,
                "by_kind": by_kind,
                "added_per_day": {day.isoformat(): per_day.get(day, 0) for day in days},
            },
            "interactions": {
                "total": n_interactions,
                "by_route": by_route,
                "system2_rate": (n_system2 / n_interactions) if n_interactions else None,
                "system2_runs": int(system2_runs or 0),
                "system2_acceptance_rate": (int(accepted or 0) / n_system2) if n_system2 else None,
                "tokens_system1": int(totals[1]),
                "tokens_system2": int(totals[2]),
                "system2_calls": int(totals[3]),
                "teacher_prompt_tokens": int(totals[4]),
                "teacher_completion_tokens": int(totals[5]),
                "teacher_accepted": int(taught or 0),
                "errors": int(errors or 0),
            },
        }


def _stratified_sample(candidates: list[tuple[int, datetime]], limit: int, rng: random.Random) -> list[int]:
    """Pick up to ``limit`` ids from time-sorted ``candidates``, round-robin over equal-width time buckets."""
    if len(candidates) <= limit:
        return [row_id for row_id, _ in candidates]
    first, last = candidates[0][1], candidates[-1][1]
    span = (last - first).total_seconds()
    n_buckets = max(1, min(_RETENTION_BUCKETS, limit))
    buckets: list[list[int]] = [[] for _ in range(n_buckets)]
    for row_id, created_at in candidates:
        position = (created_at - first).total_seconds() / span if span > 0 else 0.0
        buckets[min(n_buckets - 1, int(position * n_buckets))].append(row_id)
    for bucket in buckets:
        rng.shuffle(bucket)
    chosen: list[int] = []
    while len(chosen) < limit:
        live = [bucket for bucket in buckets if bucket]
        rng.shuffle(live)
        for bucket in live[: limit - len(chosen)]:
            chosen.append(bucket.pop())
    return chosen
