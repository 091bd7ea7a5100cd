"""Scopes (task tags) as a whole: what each holds, and renaming, merging or pinning one.

A scope is the tag shared by examples, interactions, adapters and consolidation runs; it names the task
an adapter is scoped to. Scopes appear by themselves (the runtime groups untagged traffic, see
``policies.scoping.ScopeIndex``) or from callers' tags; an operator gives them better names or merges two
that are one task (``agent scopes rename|merge``), or pins one whose adapter must not change
(``agent scopes pin``: consolidation leaves a pinned scope alone; its examples keep accumulating).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from sqlalchemy import func, select, update

from .buffer import dedup_key
from .db import StoreBase
from .errors import StoreError
from .schema import Adapter, AdapterStatus, ConsolidationRun, Example, Interaction, ScopePin


class ScopesMixin(StoreBase):
    """Listing, renaming and merging scopes."""

    def example_tags(self) -> list[Optional[str]]:
        """Every tag that has examples (None for untagged ones), sorted with None first."""
        with self._read() as session:
            tags = set(session.scalars(select(Example.tag).distinct()))
        return sorted(tags, key=lambda t: (t is not None, t or ""))

    def scopes(self) -> list[dict[str, Any]]:
        """One summary per scope: examples by status, interactions, the serving adapter version, pinned or not."""
        summary: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"examples": {}, "interactions": 0, "serving_version": None, "adapters": 0, "pinned": False})
        with self._read() as session:
            for pin in session.scalars(select(ScopePin)):
                summary[pin.scope]["pinned"] = True
            for tag, status, n in session.execute(
                    select(Example.tag, Example.status, func.count()).where(Example.tag.is_not(None))
                    .group_by(Example.tag, Example.status)):
                summary[tag]["examples"][status] = n
            for tag, n in session.execute(select(Interaction.tag, func.count()).where(Interaction.tag.is_not(None))
                                          .group_by(Interaction.tag)):
                summary[tag]["interactions"] = n
            for row in session.scalars(select(Adapter).where(Adapter.scope.is_not(None))):
                summary[row.scope]["adapters"] += 1
                if row.serving:
                    summary[row.scope]["serving_version"] = row.version
        return [{"scope": tag, **values} for tag, values in sorted(summary.items())]

    def rename_scope(self, old: str, new: str, merge: bool = False) -> int:
        """Give scope ``old`` the name ``new`` everywhere, in one transaction; returns the examples moved.

        When ``new`` already exists this is a merge, refused unless ``merge``: ``old``'s examples join
        ``new`` (an input both hold stays once, as ``new`` has it), and ``old``'s adapters move to ``new``
        but stop serving (``new``'s serving adapter keeps serving; they stay available to roll back to)."""
        old, new = old.strip(), new.strip()
        if not old or not new:
            raise StoreError("a scope name cannot be empty")
        if old == new:
            raise StoreError(f"scope {old!r} already has that name")
        with self._write() as session:
            if not self._scope_exists(session, old):
                raise StoreError(f"there is no scope {old!r}; `agent scopes ls` lists them")
            exists = self._scope_exists(session, new)
            if exists and not merge:
                raise StoreError(f"scope {new!r} exists already; merge {old!r} into it with `agent scopes merge`")
            taken = set(session.scalars(select(Example.dedup_key).where(Example.tag == new)))
            moved = 0
            for row in session.scalars(select(Example).where(Example.tag == old)):
                key = dedup_key(row.input, new)
                if key in taken:
                    session.delete(row)
                    continue
                row.tag, row.dedup_key = new, key
                taken.add(key)
                moved += 1
            session.execute(update(Interaction).where(Interaction.tag == old).values(tag=new))
            session.execute(update(ConsolidationRun).where(ConsolidationRun.scope == old).values(scope=new))
            adapters = update(Adapter).where(Adapter.scope == old)
            if exists:
                session.execute(adapters.where(Adapter.serving.is_(True))
                                .values(serving=False, status=AdapterStatus.RETIRED.value))
            session.execute(adapters.values(scope=new))
            pin = session.get(ScopePin, old)
            if pin is not None:  # the pin follows the name; merged into a pinned scope, the result stays pinned
                session.delete(pin)
                if session.get(ScopePin, new) is None:
                    session.flush()
                    session.add(ScopePin(scope=new, pinned_at=pin.pinned_at, reason=pin.reason))
        return moved

    def pin_scope(self, scope: str, reason: str = "") -> None:
        """Pin ``scope``: no consolidation trains it (the scheduler skips it, a manual run is refused) until
        :meth:`unpin_scope`; its serving adapter stays, and rollbacks still work."""
        scope = scope.strip()
        with self._write() as session:
            if not self._scope_exists(session, scope):
                raise StoreError(f"there is no scope {scope!r}; `agent scopes ls` lists them")
            if session.get(ScopePin, scope) is None:
                session.add(ScopePin(scope=scope, reason=reason))

    def unpin_scope(self, scope: str) -> bool:
        """Let consolidation train ``scope`` again; False when it was not pinned."""
        with self._write() as session:
            pin = session.get(ScopePin, scope.strip())
            if pin is None:
                return False
            session.delete(pin)
            return True

    def pinned_scopes(self) -> set[str]:
        """The scopes consolidation must leave alone."""
        with self._read() as session:
            return set(session.scalars(select(ScopePin.scope)))

    @staticmethod
    def _scope_exists(session: Any, name: str) -> bool:
        return any(session.scalar(select(func.count()).select_from(table).where(column == name))
                   for table, column in ((Example, Example.tag), (Adapter, Adapter.scope),
                                         (Interaction, Interaction.tag)))
