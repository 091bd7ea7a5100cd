"""Routing: when is System 1's direct answer good enough, and when must System 2 run?

System 2 costs 10-100x the tokens of System 1, and the point of distillation is to stop paying it
where System 1 has learned the task. So each query gets a cheap confidence score for System 1's
greedy answer, and a router sends it to System 2 only when the score is below a threshold.

Two estimators:

- :func:`token_confidence`: from the token log-probs of System 1's answer span (free: one pass).
- :func:`sample_agreement`: how often a few sampled System 1 answers match the greedy one (costs
  extra samples, but is better calibrated for small models).

The threshold is not guessed: :func:`calibrate` picks it from logged (score, System 1 was right)
pairs, for a target System 2 rate (a compute budget) or a target System 1 precision (a quality bar).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal, Sequence

from policies.answers import AnswerKind, answers_match

logger = logging.getLogger(__name__)

Route = Literal["system1", "system2"]


# --- confidence estimators -------------------------------------------------------------------------
def token_confidence(
    logprobs: Sequence[float], *, reducer: Literal["min", "quantile", "mean"] = "quantile", q: float = 0.1
) -> float:
    """Confidence in [0, 1] from the per-token log-probs of System 1's greedy answer span.

    Uses a low quantile (or the minimum, or the mean) of the token *probabilities*, not the sequence
    probability: a product of probabilities falls with length, so a long correct answer would look
    less sure than a short wrong one. One unsure token is what signals a guess, which is why a low
    quantile is the default. Empty spans give 0.0 (no evidence means no confidence).
    """
    if not logprobs:
        return 0.0
    probs = sorted(min(1.0, math.exp(lp)) if not math.isnan(lp) else 0.0 for lp in logprobs)
    if reducer == "min":
        value = probs[0]
    elif reducer == "mean":
        value = sum(probs) / len(probs)
    elif reducer == "quantile":
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        # Linear interpolation between order statistics (numpy's default "linear" method).
        position = q * (len(probs) - 1)
        low = math.floor(position)
        high = min(low + 1, len(probs) - 1)
        value = probs[low] + (probs[high] - probs[low]) * (position - low)
    else:
        raise ValueError(f"unknown reducer {reducer!r}; known: min, quantile, mean")
    return max(0.0, min(1.0, value))


def logprob_confidence(logprobs: Sequence[float], quantile: float) -> float:
    """The ``logprob`` estimator as routing configures it: the ``quantile`` of the token probabilities (the
    minimum at 0). One function, so that the gate calibrates a new adapter on the score the router reads."""
    return token_confidence(logprobs, reducer="min" if quantile <= 0 else "quantile", q=quantile)


def sample_agreement(greedy: str | None, samples: Sequence[str | None], kind: AnswerKind = "text") -> float:
    """Share of sampled System 1 answers that match the greedy answer (0.0 with none to compare)."""
    if greedy is None or not samples:
        return 0.0
    return sum(answers_match(greedy, s, kind) for s in samples) / len(samples)


# --- routers ---------------------------------------------------------------------------------------
@dataclass
class RouteDecision:
    """Where one query went and why (logged with the interaction, so routing can be audited)."""

    route: Route
    estimator: str
    """Name of the confidence estimator that produced ``score`` ("none" for fixed routers)."""
    score: float | None
    threshold: float | None


class ThresholdRouter:
    """System 2 when System 1's confidence is below ``threshold``; also when there is no score."""

    name = "threshold"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def route(self, score: float | None, *, estimator: str = "token_confidence",
              adapter_threshold: float | None = None) -> RouteDecision:
        """``adapter_threshold``: the serving adapter's own (:func:`takeover_threshold`), when higher."""
        threshold = self.threshold if adapter_threshold is None else max(self.threshold, adapter_threshold)
        # No score (e.g. System 1 produced no answer span) is no evidence: pay for System 2.
        target: Route = "system2" if score is None or score < threshold else "system1"
        return RouteDecision(route=target, estimator=estimator, score=score, threshold=threshold)


class AlwaysSystem2Router:
    """Every query to System 2: the start of the loop, or to collect calibration data."""

    name = "always"

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = None  # accepted for a uniform constructor; unused

    def route(self, score: float | None = None, *, estimator: str = "none",
              adapter_threshold: float | None = None) -> RouteDecision:
        return RouteDecision(route="system2", estimator=estimator, score=score, threshold=None)


class NeverSystem2Router:
    """Every query to System 1: serving a distilled model only, or measuring System 1 alone."""

    name = "never"

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = None

    def route(self, score: float | None = None, *, estimator: str = "none",
              adapter_threshold: float | None = None) -> RouteDecision:
        return RouteDecision(route="system1", estimator=estimator, score=score, threshold=None)


Router = ThresholdRouter | AlwaysSystem2Router | NeverSystem2Router

ROUTERS: dict[str, type[Router]] = {
    "threshold": ThresholdRouter,
    "always": AlwaysSystem2Router,
    "never": NeverSystem2Router,
}


def make_router(name: str, threshold: float = 0.5) -> Router:
    """The router called ``name`` (see :data:`ROUTERS`)."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}") from None
    return cls(threshold)


# --- calibration -----------------------------------------------------------------------------------
MIN_CALIBRATION_RECORDS = 5


@dataclass
class CalibrationPoint:
    """What one threshold would have done on the calibration records."""

    threshold: float
    system2_rate: float
    """Share of records with score < threshold (sent to System 2)."""
    system1_precision: float | None
    """Share of the records kept on System 1 where System 1 was right; None when none are kept."""
    system1_coverage: float
    """Share of records kept on System 1 (1 - system2_rate)."""


@dataclass
class Calibration:
    threshold: float
    curve: list[CalibrationPoint]
    n: int
    target: str
    """The target that chose ``threshold``, e.g. "system2_rate<=0.3" or "system1_precision>=0.9"."""


def _curve(records: Sequence[tuple[float, bool]]) -> list[CalibrationPoint]:
    n = len(records)
    scores = sorted({score for score, _ in records})
    # One extra threshold just above the top score: everything goes to System 2.
    thresholds = scores + [math.nextafter(scores[-1], math.inf)]
    by_score = sorted(records, key=lambda r: r[0])
    curve: list[CalibrationPoint] = []
    below = 0  # records with score < threshold, walking thresholds upwards
    kept_correct = sum(correct for _, correct in records)
    for threshold in thresholds:
        while below < n and by_score[below][0] < threshold:
            kept_correct -= by_score[below][1]
            below += 1
        kept = n - below
        curve.append(
            CalibrationPoint(
                threshold=threshold,
                system2_rate=below / n,
                system1_precision=kept_correct / kept if kept else None,
                system1_coverage=kept / n,
            )
        )
    return curve


def calibrate(
    records: Sequence[tuple[float, bool]],
    *,
    target_system2_rate: float | None = None,
    target_precision: float | None = None,
) -> Calibration:
    """Pick the routing threshold from logged (System 1 confidence, System 1 was correct) records.

    "Correct" means System 1 agreed with the accepted System 2 answer, so no labels are needed.
    Give exactly one target:

    - ``target_system2_rate``: a compute budget; the threshold whose System 2 rate is closest to it
      without exceeding it.
    - ``target_precision``: a quality bar; the lowest threshold at which System 1's precision on the
      inputs it keeps (score >= threshold) reaches it. If none does, every input goes to System 2.
    """
    if len(records) < MIN_CALIBRATION_RECORDS:
        raise ValueError(
            f"calibration needs at least {MIN_CALIBRATION_RECORDS} records, got {len(records)}; "
            "route more queries to System 2 (router 'always') first"
        )
    if (target_system2_rate is None) == (target_precision is None):
        raise ValueError("give exactly one of target_system2_rate and target_precision")
    curve = _curve(records)
    if target_system2_rate is not None:
        if not 0.0 <= target_system2_rate <= 1.0:
            raise ValueError(f"target_system2_rate must be in [0, 1], got {target_system2_rate}")
        # Rates grow with the threshold, and the lowest threshold has rate 0, so one always fits.
        chosen = max((p for p in curve if p.system2_rate <= target_system2_rate), key=lambda p: p.threshold)
        target = f"system2_rate<={target_system2_rate:g}"
    else:
        assert target_precision is not None
        if not 0.0 <= target_precision <= 1.0:
            raise ValueError(f"target_precision must be in [0, 1], got {target_precision}")
        reaching = [
            p for p in curve if p.system1_precision is not None and p.system1_precision >= target_precision
        ]
        if reaching:
            chosen = min(reaching, key=lambda p: p.threshold)
        else:
            logger.warning(
                "no threshold reaches System 1 precision %.3f on %d records; routing everything to System 2",
                target_precision,
                len(records),
            )
            chosen = curve[-1]
        target = f"system1_precision>={target_precision:g}"
    return Calibration(threshold=chosen.threshold, curve=curve, n=len(records), target=target)


def takeover_threshold(records: Sequence[tuple[float, bool]], *, floor: float, target_precision: float
                       ) -> float:
    """The confidence an adapter's answer needs to stand without System 2, from (confidence, agreed with System
    2's answer) records of its answers: the lowest threshold, from ``floor`` (the configured one) up, at which
    at least :data:`MIN_CALIBRATION_RECORDS` answers are kept and ``target_precision`` of them agree; above 1,
    so nothing alone, when no threshold does, fewer than :data:`MIN_CALIBRATION_RECORDS` records included.

    Why: a gate compares a candidate with what serves, and on a scope's first run that is the base model,
    which gets nothing right; so an adapter trained on a few dozen examples is promoted at 0.5-0.7 on its
    holdout and then answers at confidences the global threshold accepts (a sums adapter answered 24 sums at
    0.51-0.98 and got 13 right). Calibrated on its own answers, it answers alone only where it was right.
    With too few answers to tell, it answers nothing alone until System 2 has checked enough of them: a
    counting adapter promoted on one held-out word (right) answered 22 words alone in a live replay, 7 wrongly.

    One pass over the records sorted by confidence, highest first (serving calls this on every checked
    answer, with hundreds of records)."""
    ranked = sorted(((score, right) for score, right in records if score >= floor), reverse=True)
    found: float | None = None
    kept = agreed = 0
    for i, (score, right) in enumerate(ranked):
        kept, agreed = kept + 1, agreed + right
        if i + 1 < len(ranked) and ranked[i + 1][0] == score:
            continue  # a threshold keeps every record at its score
        if kept >= MIN_CALIBRATION_RECORDS and agreed / kept >= target_precision:
            found = score  # the lowest so far; a lower score may still qualify
    if found is None:
        return math.nextafter(1.0, math.inf)  # wrong wherever it was sure: nothing alone (scores are at most 1)
    if found == ranked[-1][0]:
        return floor  # every record from the floor up qualifies: the floor itself is the lowest threshold
    return found


class TakeoverEvidence:
    """What each served adapter's answers have shown so far, and the threshold it follows
    (:func:`takeover_threshold` over the records).

    An adapter starts with its gate's records (its held-out answers). Then every input it serves that still goes
    to System 2 (below its threshold) and gets an accepted answer is one more record: System 1's answer and its
    confidence are there, System 2's is the label. So an adapter that was unsure at promotion takes its inputs
    over as its answers prove right at lower confidences, without another training run. Only the most recent
    ``keep`` live records count, beside the gate's. Records come only from sources that may teach: a client
    that chose agreeing inputs could otherwise lower the bar for everyone. Not thread-safe: the caller locks."""

    def __init__(self, floor: float, target_precision: float, keep: int = 500) -> None:
        self.floor, self.target_precision, self.keep = floor, target_precision, keep
        self._gate: dict[int, list[tuple[float, bool]]] = {}
        self._live: dict[int, deque[tuple[float, bool]]] = {}
        self._thresholds: dict[int, float] = {}

    def start(self, version: int, gate_records: Sequence[tuple[float, bool]]) -> None:
        """Follow ``version`` from its gate's records (again from those alone if it was followed before)."""
        self._gate[version] = [(float(score), bool(right)) for score, right in gate_records]
        self._live[version] = deque(maxlen=self.keep)
        self._update(version)

    def add(self, version: int, score: float, right: bool) -> None:
        """One more answer of ``version`` checked against System 2's (ignored for a version not followed)."""
        if version in self._live:
            self._live[version].append((score, right))
            self._update(version)

    def threshold(self, version: int | None) -> float | None:
        """The threshold ``version``'s answers need now; None when it is not followed: the configured one."""
        return self._thresholds.get(version) if version is not None else None

    def records(self, version: int) -> int:
        """How many records ``version``'s threshold rests on."""
        return len(self._gate.get(version, ())) + len(self._live.get(version, ()))

    def _update(self, version: int) -> None:
        records = [*self._gate[version], *self._live[version]]
        self._thresholds[version] = takeover_threshold(records, floor=self.floor,
                                                       target_precision=self.target_precision)
