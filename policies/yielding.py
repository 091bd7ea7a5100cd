"""When a training process beside serving computes, and when it pauses for users.

On a CPU server, a consolidation run and users' requests share the same cores: measured in the live
replay, System 1 answers took 1.3 s at the median while a run trained beside them, against 0.53 s with
nothing else running. Users' requests come in bursts with gaps between them, so the run can compute
in the gaps instead, and pause while a request is in the engine. A server that is never idle would
then never train; so the run is paused at most ``turn`` seconds in all, after which it computes for
``turn`` seconds whatever comes: under a load without gaps, it keeps about half its speed. "In all": the
pauses add up over the short gaps between requests (the engine empty for a few milliseconds between one
client's answer and the next client's question), and only a gap of at least ``turn`` seconds, in which
the run computed that long, starts the count again. A turn of 2 s, then 0.5 s beside users, left a sums
run in the live replay (two clients) a third of the CPU, and it trained in 435 s instead of 90-160 s: its
adapter came a window later.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerTurns:
    """Decides, from whether users' work is in the engine and the time, whether the trainer may compute.

    :meth:`computes` is called at each change the engine sees (a request arriving, an iteration ending);
    it is not thread-safe, the engine calls it under its own lock."""

    turn: float
    """The longest the trainer waits in all while users' work keeps the engine busy, and how long it then
    computes beside users before it may be paused again (seconds, > 0)."""
    _paused_since: float | None = field(default=None, init=False)
    _waited: float = field(default=0.0, init=False)
    """Paused time since the last gap of at least a turn (or the last forced turn), the pause under way aside."""
    _free_since: float = field(default=float("-inf"), init=False)
    _runs_until: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        if not self.turn > 0:
            raise ValueError(f"turn must be > 0 seconds, got {self.turn}")

    def computes(self, users: bool, now: float) -> bool:
        """Whether the trainer computes at ``now`` (monotonic seconds), users' work being in the engine or not."""
        if now < self._runs_until:
            return True
        if not users:
            if self._paused_since is not None:  # a pause ends
                self._waited += now - self._paused_since
                self._paused_since = None
                self._free_since = now
            return True
        if self._paused_since is None:  # a pause begins
            if now - self._free_since >= self.turn:
                self._waited = 0.0  # a real gap: the trainer computed a turn since it last waited
            self._paused_since = now
        if self._waited + now - self._paused_since < self.turn:
            return False
        self._paused_since, self._waited = None, 0.0
        self._runs_until = self._free_since = now + self.turn
        return True

    @property
    def paused(self) -> bool:
        """Whether the last decision paused the trainer."""
        return self._paused_since is not None
