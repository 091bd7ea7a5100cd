"""The adapter registry: which LoRA versions exist, what the gate said about them, and which one serves.

Each scope (a task tag, or None for the general adapter) has at most one serving adapter. Promotion and
rollback flip ``serving`` in one transaction, so a reader always sees exactly one (or no) serving adapter per
scope. The store never touches adapter folders (:meth:`prune_adapters` returns the rows whose folders the
caller should delete); it can keep a copy of a promoted adapter's files (:mod:`store.adapter_files`), which is
how replicas without a shared folder serve it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping, Optional

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .adapter_files import drop_files, has_files, put_files
from .db import StoreBase, chunks
from .errors import StoreError
from .schema import Adapter, AdapterStatus, ConsolidationRun, Example, ExampleStatus, RunStatus, utcnow

logger = logging.getLogger(__name__)

ALL_SCOPES: Any = object()
"""Default of ``list_adapters(scope=...)``: every scope. (``scope=None`` means the general adapter only.)"""

_UPDATABLE = frozenset({"path", "parent", "scope", "status", "metrics", "n_train", "run_id", "files_deleted"})


def _scope_is(scope: Optional[str]) -> Any:
    return Adapter.scope.is_(None) if scope is None else Adapter.scope == scope


def _scope_name(scope: Optional[str]) -> str:
    return "general" if scope is None else repr(scope)


def _serve(session: Session, row: Adapter) -> None:
    """Make ``row`` the one serving adapter of its scope (inside the caller's transaction)."""
    # Lock the scope's rows (PostgreSQL) so two concurrent promotions cannot both leave one serving.
    session.execute(select(Adapter.version).where(_scope_is(row.scope)).with_for_update())
    session.execute(
        update(Adapter).where(_scope_is(row.scope), Adapter.serving.is_(True), Adapter.version != row.version).values(serving=False)
    )
    row.status = AdapterStatus.PROMOTED.value
    row.serving = True
    row.promoted_at = utcnow()


def _servable(session: Session, row: Adapter) -> Optional[str]:
    """Why ``row`` cannot be served, or None when it can (its folder exists here, or the store has its files)."""
    if row.status not in (AdapterStatus.PROMOTED, AdapterStatus.RETIRED):
        return f"adapter v{row.version} was never promoted (status {row.status!r})"
    if row.files_deleted or not (os.path.isdir(row.path) or has_files(session, row.version)):
        return f"adapter v{row.version}'s files are gone ({row.path})"
    return None


class AdaptersMixin(StoreBase):
    """Registering, promoting, rolling back and pruning adapter versions."""

    def next_adapter_version(self) -> int:
        """One more than the highest version ever registered (1 for the first); 0 means the base model."""
        with self._read() as session:
            return int(session.scalar(select(func.max(Adapter.version))) or 0) + 1

    def register_adapter(
        self,
        version: int,
        path: str,
        parent: Optional[int],
        status: str = AdapterStatus.CANDIDATE.value,
        metrics: Optional[dict[str, Any]] = None,
        n_train: int = 0,
        run_id: Optional[int] = None,
        scope: Optional[str] = None,
    ) -> Adapter:
        """Record a trained adapter version; it does not serve until :meth:`promote_adapter`."""
        if version < 1:
            raise StoreError(f"adapter versions start at 1 (0 is the base model), not {version}")
        status = _adapter_status(status)
        row = Adapter(
            version=version, path=os.fspath(path), parent=parent or None, status=status, metrics=metrics or {},
            n_train=n_train, run_id=run_id, scope=scope, serving=False,
        )  # fmt: skip
        try:
            with self._write() as session:
                session.add(row)
        except IntegrityError:
            raise StoreError(f"adapter version {version} is already registered") from None
        logger.info("registered adapter v%d (%s scope, %s) at %s", version, _scope_name(scope), status, path)
        return row

    def commit_adapter(
        self,
        version: int,
        path: str,
        parent: Optional[int],
        *,
        promote: bool,
        scope: Optional[str] = None,
        metrics: Optional[dict[str, Any]] = None,
        n_train: int = 0,
        run_id: Optional[int] = None,
        used_examples: Iterable[int] = (),
        reason: str = "",
        n_holdout: int = 0,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> Adapter:
        """A consolidation's outcome in one transaction: all of it is recorded, or (after a crash) none.

        Registers ``version`` as promoted (serving its scope, ``used_examples`` marked ``used`` by it) or as
        rejected (the examples stay as they are), and finishes run ``run_id`` with the same status. Done as
        separate calls, a crash in between could leave an adapter serving while the examples it learned are
        still ``pending`` (trained on again next time), or a finished adapter under a run reaped as crashed.
        ``files`` (name -> content of the adapter's folder) are stored with it, for replicas on other machines.
        """
        if version < 1:
            raise StoreError(f"adapter versions start at 1 (0 is the base model), not {version}")
        status = AdapterStatus.PROMOTED if promote else AdapterStatus.REJECTED
        row = Adapter(
            version=version, path=os.fspath(path), parent=parent or None, status=status.value, metrics=metrics or {},
            n_train=n_train, run_id=run_id, scope=scope, serving=False,
        )  # fmt: skip
        ids = list(used_examples) if promote else []
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                if files:
                    put_files(session, version, files)
                if promote:
                    _serve(session, row)
                    now = utcnow()
                    for part in chunks(ids):
                        session.execute(
                            update(Example).where(Example.id.in_(part))
                            .values(status=ExampleStatus.USED.value, adapter_version=version, updated_at=now)
                        )  # fmt: skip
                if run_id is not None:
                    run = session.get(ConsolidationRun, run_id)
                    if run is None:
                        raise StoreError(f"no consolidation run {run_id}")
                    run.status, run.finished_at, run.reason = status.value, utcnow(), reason
                    run.metrics, run.adapter_version, run.n_train, run.n_holdout = metrics, version, n_train, n_holdout
        except IntegrityError:
            raise StoreError(f"adapter version {version} is already registered") from None
        logger.info("committed adapter v%d (%s scope, %s) at %s", version, _scope_name(scope), status.value, path)
        return row

    def update_adapter(self, version: int, **fields: Any) -> Adapter:
        """Change recorded fields of an adapter (not ``serving``: use promote/rollback); returns the row."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise StoreError(f"update_adapter: cannot set {sorted(unknown)}; settable: {sorted(_UPDATABLE)}")
        if "status" in fields:
            fields["status"] = _adapter_status(fields["status"])
        with self._write() as session:
            row = session.get(Adapter, version)
            if row is None:
                raise StoreError(f"no adapter version {version}")
            for key, value in fields.items():
                setattr(row, key, value)
        return row

    def promote_adapter(self, version: int) -> None:
        """Serve ``version`` in its scope; the adapter serving there before stops, atomically."""
        with self._write() as session:
            row = session.get(Adapter, version)
            if row is None:
                raise StoreError(f"cannot promote adapter v{version}: no such version")
            if row.files_deleted:
                raise StoreError(f"cannot promote adapter v{version}: its files were pruned ({row.path})")
            _serve(session, row)
        logger.info("promoted adapter v%d (%s scope)", version, _scope_name(row.scope))

    def serving_adapter(self, scope: Optional[str] = None) -> Optional[Adapter]:
        """The adapter serving ``scope`` (None: the general one), or None when the base model serves."""
        with self._read() as session:
            return session.scalar(select(Adapter).where(_scope_is(scope), Adapter.serving.is_(True)))

    def get_adapter(self, version: int) -> Optional[Adapter]:
        """One adapter by version, or None."""
        with self._read() as session:
            return session.get(Adapter, version)

    def list_adapters(self, scope: Any = ALL_SCOPES) -> list[Adapter]:
        """Adapters by version; all scopes by default, ``scope=None`` for general adapters only."""
        query = select(Adapter).order_by(Adapter.version)
        if scope is not ALL_SCOPES:
            query = query.where(_scope_is(scope))
        with self._read() as session:
            return list(session.scalars(query))

    def rollback_targets(self, version: int | None = None, scope: str | None = None) -> list[Adapter]:
        """What :meth:`rollback` with these arguments may serve, best first, changing nothing.

        ``[]`` for ``version=0`` (the base model); ``[vN]`` for a version that can serve; with no version, every
        servable ancestor of the serving adapter, nearest first. Raises :class:`StoreError` as :meth:`rollback`
        would. A runtime loads a target's weights before it commits (load-then-commit), trying the next
        ancestor when one fails to load, then calls :meth:`rollback` with the version that loaded.
        """
        if version == 0:
            return []
        with self._read() as session:
            if version is not None:
                return [_explicit_target(session, version)]
            current, targets, skipped = _ancestors(session, scope)
        if not targets:
            raise _no_ancestor(current, skipped)
        return targets

    def rollback(self, version: Optional[int] = None, scope: Optional[str] = None) -> Optional[Adapter]:
        """Serve an earlier adapter again; returns it (None after a rollback to the base model).

        ``version=N``: serve v N (its own scope), if it was promoted once and its folder still exists.
        ``version=0``: serve no adapter in ``scope``: the base model answers.
        No version: walk the serving adapter's parent chain to the nearest servable ancestor.
        The store checks the registry and that the folder exists, not that the weights load: a caller that
        serves adapters loads them first (see :meth:`rollback_targets`).
        """
        with self._write() as session:
            if version == 0:
                session.execute(update(Adapter).where(_scope_is(scope), Adapter.serving.is_(True)).values(serving=False))
                logger.info("rolled back %s scope to the base model", _scope_name(scope))
                return None
            if version is not None:
                row = _explicit_target(session, version)
            else:
                current, targets, skipped = _ancestors(session, scope, first_only=True)
                if not targets:
                    raise _no_ancestor(current, skipped)
                row = targets[0]
            _serve(session, row)
        logger.info("rolled back %s scope to adapter v%d", _scope_name(row.scope), row.version)
        return row

    def prune_adapters(self, keep: int) -> list[Adapter]:
        """Mark old adapters' files as deleted and return them, so the caller deletes their folders.

        Per scope the serving adapter and the ``keep`` newest other promoted ones (rollback targets) stay.
        Rejected adapters go, and candidates whose run has finished; a candidate of a running
        consolidation stays. Pruned promoted adapters become ``retired``, pruned candidates ``rejected``.
        """
        if keep < 0:
            raise StoreError(f"keep must be >= 0, not {keep}")
        pruned: list[Adapter] = []
        with self._write() as session:
            running = set(
                session.scalars(select(ConsolidationRun.id).where(ConsolidationRun.status == RunStatus.RUNNING.value))
            )
            rows = session.scalars(
                select(Adapter).where(Adapter.files_deleted.is_(False)).order_by(Adapter.version.desc())
            ).all()
            kept: dict[Optional[str], int] = {}
            for row in rows:
                if row.serving:
                    continue
                if row.status in (AdapterStatus.PROMOTED, AdapterStatus.RETIRED):
                    if kept.get(row.scope, 0) < keep:
                        kept[row.scope] = kept.get(row.scope, 0) + 1
                        continue
                    row.status = AdapterStatus.RETIRED.value
                elif row.status == AdapterStatus.CANDIDATE:
                    if row.run_id is None or row.run_id in running:
                        continue
                    row.status = AdapterStatus.REJECTED.value
                row.files_deleted = True
                pruned.append(row)
            drop_files(session, [row.version for row in pruned])
        for row in pruned:
            logger.info("pruned adapter v%d (%s): delete %s", row.version, row.status, row.path)
        return pruned


def _explicit_target(session: Session, version: int) -> Adapter:
    """Adapter ``version`` if it may serve again, else the :class:`StoreError` saying why not."""
    row = session.get(Adapter, version)
    if row is None:
        raise StoreError(f"cannot roll back to adapter v{version}: no such version")
    why = _servable(session, row)
    if why:
        raise StoreError(f"cannot roll back to adapter v{version}: {why}")
    return row


def _ancestors(session: Session, scope: str | None, first_only: bool = False
               ) -> tuple[Adapter, list[Adapter], list[str]]:
    """The adapter serving ``scope``, its servable ancestors nearest first, and why the others cannot serve."""
    current = session.scalar(select(Adapter).where(_scope_is(scope), Adapter.serving.is_(True)))
    if current is None:
        raise StoreError(f"no adapter serves the {_scope_name(scope)} scope; nothing to roll back")
    targets: list[Adapter] = []
    skipped: list[str] = []
    parent, seen = current.parent, {current.version}
    while parent and parent not in seen:
        seen.add(parent)
        candidate = session.get(Adapter, parent)
        if candidate is None:
            break
        why = _servable(session, candidate)
        if why is None:
            targets.append(candidate)
            if first_only:
                break
        else:
            skipped.append(why)
        parent = candidate.parent
    return current, targets, skipped


def _no_ancestor(current: Adapter, skipped: list[str]) -> StoreError:
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    return StoreError(
        f"adapter v{current.version} has no earlier servable adapter in its parent chain{detail}; "
        "use rollback(version=0) to serve the base model"
    )


def _adapter_status(value: Any) -> str:
    try:
        return AdapterStatus(value).value
    except ValueError:
        raise StoreError(f"adapter status must be one of {[s.value for s in AdapterStatus]}, not {value!r}") from None
