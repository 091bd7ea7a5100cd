"""Consolidation runs and the cross-process lock that keeps two of them from running at once.

A run records the pid and host that started it, so a run whose process died (killed, out of memory, power
cut) can be told from one still training: :meth:`reap_crashed_runs` marks those ``crashed``.

The lock is a row in ``locks``. Taking it is one transaction: insert the row, or take over a row whose holder
stopped heartbeating for ``ttl_s`` seconds or whose process is dead on this host. Liveness is checked with
``os.kill(pid, 0)``, which only means something on the same host; a holder on another host is trusted until
its heartbeat goes stale.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Optional

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from .db import StoreBase
from .errors import StoreError
from .schema import ConsolidationRun, Lock, RunStatus, utcnow

logger = logging.getLogger(__name__)

_FINISH_FIELDS = frozenset({"n_train", "n_holdout", "metrics", "adapter_version", "reason", "config", "scope"})


def pid_alive(pid: Optional[int]) -> bool:
    """Whether a process with this pid exists on this host (a pid we may not signal still exists)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_host() -> str:
    """The host name recorded with runs and locks."""
    return socket.gethostname()


class RunsMixin(StoreBase):
    """Recording consolidation runs, and the named cross-process lock."""

    def start_run(self, scope: Optional[str] = None, config: Optional[dict[str, Any]] = None) -> int:
        """Record a consolidation run as ``running`` by this process; returns its id."""
        with self._write() as session:
            run = ConsolidationRun(
                status=RunStatus.RUNNING.value, pid=os.getpid(), host=this_host(), scope=scope, config=config
            )
            session.add(run)
            session.flush()
            return run.id

    def finish_run(self, run_id: int, status: str, **fields: Any) -> ConsolidationRun:
        """Record how a run ended (any status but ``running``) and what it produced; returns the row."""
        unknown = set(fields) - _FINISH_FIELDS
        if unknown:
            raise StoreError(f"finish_run: unknown field(s) {sorted(unknown)}; known: {sorted(_FINISH_FIELDS)}")
        try:
            status = RunStatus(status).value
        except ValueError:
            raise StoreError(f"run status must be one of {[s.value for s in RunStatus]}, not {status!r}") from None
        if status == RunStatus.RUNNING:
            raise StoreError("finish_run: a finished run cannot have status 'running'")
        with self._write() as session:
            run = session.get(ConsolidationRun, run_id)
            if run is None:
                raise StoreError(f"no consolidation run {run_id}")
            run.status = status
            run.finished_at = utcnow()
            for key, value in fields.items():
                setattr(run, key, value)
        return run

    def get_run(self, run_id: int) -> Optional[ConsolidationRun]:
        """One run by id, or None."""
        with self._read() as session:
            return session.get(ConsolidationRun, run_id)

    def list_runs(self, limit: Optional[int] = 20) -> list[ConsolidationRun]:
        """The newest runs first."""
        query = select(ConsolidationRun).order_by(ConsolidationRun.started_at.desc(), ConsolidationRun.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def last_runs_by_scope(self) -> dict[Optional[str], ConsolidationRun]:
        """Each scope's most recently started run (key None: the general adapter's)."""
        newest = select(func.max(ConsolidationRun.id)).group_by(ConsolidationRun.scope)
        with self._read() as session:
            return {run.scope: run for run in session.scalars(select(ConsolidationRun).where(
                ConsolidationRun.id.in_(newest)))}

    def last_run(self) -> Optional[ConsolidationRun]:
        """The most recently started run, or None."""
        runs = self.list_runs(limit=1)
        return runs[0] if runs else None

    def reap_crashed_runs(self) -> list[int]:
        """Mark ``crashed`` every running run started on this host whose process is gone; returns their ids."""
        host = this_host()
        reaped: list[int] = []
        with self._write() as session:
            running = session.scalars(
                select(ConsolidationRun).where(
                    ConsolidationRun.status == RunStatus.RUNNING.value, ConsolidationRun.host == host
                )
            ).all()
            for run in running:
                if pid_alive(run.pid):
                    continue
                run.status = RunStatus.CRASHED.value
                run.finished_at = utcnow()
                run.reason = f"process {run.pid} on {host} exited without finishing the run"
                reaped.append(run.id)
        if reaped:
            logger.warning("marked consolidation run(s) %s as crashed: their processes are gone", reaped)
        return reaped

    # --- the lock ----------------------------------------------------------------------------------------------

    def acquire_lock(self, name: str, owner: str, ttl_s: float = 600) -> bool:
        """Take the lock ``name`` for ``owner`` (this process); False when someone alive holds it.

        Taking it again from the same owner and process refreshes it and returns True.
        """
        host, pid = this_host(), os.getpid()
        for _ in range(3):
            now = utcnow()
            try:
                with self._write() as session:
                    row = session.get(Lock, name, with_for_update=True)
                    if row is None:
                        session.add(Lock(name=name, owner=owner, pid=pid, host=host, acquired_at=now, heartbeat_at=now))
                        return True
                    if row.owner == owner and row.pid == pid and row.host == host:
                        row.heartbeat_at = now
                        return True
                    stale = row.heartbeat_at < now - timedelta(seconds=ttl_s)
                    dead = row.host == host and not pid_alive(row.pid)
                    if not (stale or dead):
                        return False
                    logger.warning(
                        "taking over lock %r from %s (pid %d on %s): %s",
                        name, row.owner, row.pid, row.host, "its process is gone" if dead else f"no heartbeat for {ttl_s:g}s",
                    )  # fmt: skip
                    row.owner, row.pid, row.host, row.acquired_at, row.heartbeat_at = owner, pid, host, now, now
                    return True
            except IntegrityError:
                continue  # another process inserted the row between our read and insert: look again
        return False

    def heartbeat(self, name: str, owner: str) -> None:
        """Keep holding the lock; raises :class:`StoreError` when it is no longer ours (it was taken over)."""
        with self._write() as session:
            result = session.execute(
                update(Lock).where(Lock.name == name, Lock.owner == owner, Lock.pid == os.getpid()).values(heartbeat_at=utcnow())
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise StoreError(f"lock {name!r} is not held by {owner!r} in this process (it was released or taken over)")

    def release_lock(self, name: str, owner: str) -> None:
        """Let the lock go if ``owner`` holds it; releasing a lock one does not hold only logs."""
        with self._write() as session:
            result = session.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))
            if not result.rowcount:  # type: ignore[attr-defined]
                logger.warning("release_lock: %r was not held by %r", name, owner)

    def lock_holder(self, name: str) -> Optional[Lock]:
        """The current holder of lock ``name`` (possibly stale), or None."""
        with self._read() as session:
            return session.get(Lock, name)
