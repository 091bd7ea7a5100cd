"""Confidence estimators, routers and threshold calibration."""

from __future__ import annotations

import math
import random

import pytest

from policies.routing import (
    ROUTERS,
    RouteDecision,
    ThresholdRouter,
    calibrate,
    make_router,
    sample_agreement,
    TakeoverEvidence,
    takeover_threshold,
    token_confidence,
)


def test_token_confidence_is_not_biased_by_length() -> None:
    short = [math.log(0.9)] * 2
    long = [math.log(0.9)] * 40
    assert token_confidence(short) == pytest.approx(0.9)
    assert token_confidence(long) == pytest.approx(0.9)  # the sequence probability would be 0.015


def test_token_confidence_reducers() -> None:
    logprobs = [math.log(p) for p in (0.99, 0.2, 0.9, 0.95, 0.97)]
    assert token_confidence(logprobs, reducer="min") == pytest.approx(0.2)
    assert token_confidence(logprobs, reducer="mean") == pytest.approx((0.99 + 0.2 + 0.9 + 0.95 + 0.97) / 5)
    # q=0.1 of five sorted values interpolates between the two lowest: 0.2 + 0.4 * (0.9 - 0.2).
    assert token_confidence(logprobs, q=0.1) == pytest.approx(0.48)
    assert token_confidence(logprobs, q=0.0) == pytest.approx(0.2)
    assert token_confidence([]) == 0.0
    assert 0.0 <= token_confidence([0.0, 1e-9]) <= 1.0
    with pytest.raises(ValueError):
        token_confidence(logprobs, reducer="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        token_confidence(logprobs, q=1.5)


def test_sample_agreement() -> None:
    assert sample_agreement("85", ["85", "85.0", "86", None], kind="number") == 0.5
    assert sample_agreement(None, ["85"]) == 0.0
    assert sample_agreement("85", []) == 0.0


def test_threshold_router() -> None:
    router = ThresholdRouter(0.5)
    assert router.route(0.4) == RouteDecision("system2", "token_confidence", 0.4, 0.5)
    assert router.route(0.5).route == "system1"
    assert router.route(None).route == "system2"
    assert router.route(0.9, estimator="sample_agreement").estimator == "sample_agreement"
    # an adapter's own threshold counts only when higher than the configured one
    assert router.route(0.6, adapter_threshold=0.7) == RouteDecision("system2", "token_confidence", 0.6, 0.7)
    assert router.route(0.6, adapter_threshold=0.2).route == "system1"


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_is_built_by_name_and_routes_every_confidence(name: str) -> None:
    router = make_router(name, 0.7)
    for confidence in (None, 0.0, 0.69, 0.7, 1.0):
        decision = router.route(confidence)
        assert isinstance(decision, RouteDecision) and decision.route in ("system1", "system2")


def test_make_router() -> None:
    assert make_router("always").route(0.99).route == "system2"
    assert make_router("never").route(0.01).route == "system1"
    threshold = make_router("threshold", 0.7)
    assert threshold.route(0.6).route == "system2" and threshold.route(0.6).threshold == 0.7
    with pytest.raises(ValueError, match="'sometimes'") as info:
        make_router("sometimes")
    assert all(name in str(info.value) for name in ROUTERS)


# (System 1 confidence, System 1 was correct): confident answers tend to be right.
RECORDS = [(0.1, False), (0.2, False), (0.3, True), (0.4, False), (0.5, True), (0.6, True), (0.7, True), (0.8, True), (0.9, True), (0.95, True)]


def test_calibration_curve() -> None:
    cal = calibrate(RECORDS, target_system2_rate=0.5)
    assert cal.n == 10
    by_threshold = {p.threshold: p for p in cal.curve}
    point = by_threshold[0.5]
    assert point.system2_rate == 0.4 and point.system1_coverage == 0.6 and point.system1_precision == 1.0
    assert by_threshold[0.1].system2_rate == 0.0 and by_threshold[0.1].system1_precision == 0.7
    assert cal.curve[-1].system2_rate == 1.0 and cal.curve[-1].system1_precision is None


def test_calibrate_for_system2_rate() -> None:
    cal = calibrate(RECORDS, target_system2_rate=0.35)
    assert cal.threshold == 0.4  # sends 3/10 to System 2; 0.5 would send 4/10 > 0.35
    assert cal.target == "system2_rate<=0.35"
    assert calibrate(RECORDS, target_system2_rate=0.0).threshold == 0.1


def test_calibrate_for_precision() -> None:
    cal = calibrate(RECORDS, target_precision=0.85)
    assert cal.threshold == 0.3  # kept: 0.3..0.95 -> 7/8 = 0.875
    assert calibrate(RECORDS, target_precision=1.0).threshold == 0.5
    assert cal.target == "system1_precision>=0.85"


def test_unreachable_precision_routes_everything_to_system2() -> None:
    records = [(0.1 * i, False) for i in range(1, 7)]
    cal = calibrate(records, target_precision=0.5)
    assert ThresholdRouter(cal.threshold).route(0.6).route == "system2"


def test_calibrate_errors() -> None:
    with pytest.raises(ValueError, match="at least 5 records"):
        calibrate(RECORDS[:4], target_system2_rate=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(RECORDS)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(RECORDS, target_system2_rate=0.5, target_precision=0.9)
    with pytest.raises(ValueError):
        calibrate(RECORDS, target_precision=1.5)


def test_takeover_threshold_keeps_a_new_adapter_off_the_confidences_where_it_was_wrong() -> None:
    # right only at 0.5 and above: it must not answer alone below 0.5, whatever the floor says
    assert takeover_threshold(RECORDS, floor=0.3, target_precision=1.0) == 0.5
    # the floor is the operator's: a calibration never lowers it
    assert takeover_threshold(RECORDS, floor=0.6, target_precision=1.0) == 0.6
    # wrong at every confidence: it answers nothing alone (every score is below the threshold)
    wrong = [(0.1 * i, False) for i in range(1, 7)]
    assert takeover_threshold(wrong, floor=0.5, target_precision=0.9) > 1.0
    # judged from the floor up: answers right below it do not excuse those wrong above it
    mixed = [(0.1, True)] * 5 + [(0.6, False), (0.7, True), (0.8, True), (0.9, True), (0.95, True), (0.97, True)]
    assert takeover_threshold(mixed, floor=0.5, target_precision=0.8) == 0.5
    assert takeover_threshold(mixed, floor=0.5, target_precision=0.9) == 0.7
    # a threshold rests on at least 5 answers: one right answer at 0.99 does not open the way above it
    assert takeover_threshold([(0.5, False)] * 4 + [(0.99, True)], floor=0.3, target_precision=0.9) > 1.0
    # too few answers to tell (all four right): nothing alone until more are checked
    assert takeover_threshold([(0.9, True)] * 4, floor=0.5, target_precision=0.9) > 1.0
    assert takeover_threshold([], floor=0.5, target_precision=0.9) > 1.0


def test_takeover_evidence_lets_an_adapter_take_over_as_its_answers_prove_right() -> None:
    evidence = TakeoverEvidence(floor=0.5, target_precision=0.9)
    evidence.start(3, [(0.6, False), (0.7, True), (0.8, False), (0.9, True), (0.95, True)])  # its gate's
    assert evidence.threshold(3) > 1.0 and evidence.records(3) == 5  # 3 of 5 right: nothing alone
    for _ in range(20):  # System 2 then agrees with its answers at 0.6 to 0.85
        for score in (0.6, 0.7, 0.85):
            evidence.add(3, score, True)
    assert evidence.threshold(3) == 0.5 and evidence.records(3) == 65  # 62 of 65 right from the floor up
    for _ in range(10):  # and then it goes wrong at 0.7: the bar rises again, above those answers
        evidence.add(3, 0.7, False)
    assert evidence.threshold(3) == 0.8  # from 0.8 up: 22 of 23 right
    evidence.add(4, 0.99, True)  # a version never started is not followed
    assert evidence.threshold(4) is None and evidence.threshold(None) is None
    evidence.start(3, [])  # followed again (a rollback to it): from its gate's records alone, here none
    assert evidence.threshold(3) > 1.0 and evidence.records(3) == 0
    small = TakeoverEvidence(floor=0.5, target_precision=0.9, keep=5)
    small.start(1, [])
    for score, right in [(0.6, False)] * 5 + [(0.6, True)] * 5:
        small.add(1, score, right)
    assert small.records(1) == 5 and small.threshold(1) == 0.5  # only the last 5 live records count


@pytest.mark.parametrize("seed", range(20))
def test_takeover_threshold_is_the_lowest_threshold_that_meets_the_target(seed: int) -> None:
    """Against the definition, evaluated at every candidate threshold (the floor and every score above it)."""
    rng = random.Random(seed)
    records = [(round(rng.random(), 1), rng.random() < 0.8) for _ in range(rng.randint(5, 40))]
    floor, target = rng.choice([0.0, 0.3, 0.5]), rng.choice([0.7, 0.9, 1.0])

    def meets(threshold: float) -> bool:
        kept = [right for score, right in records if score >= threshold]
        return len(kept) >= 5 and sum(kept) / len(kept) >= target

    candidates = [t for t in [floor, *sorted({s for s, _ in records if s > floor})] if meets(t)]
    expected = candidates[0] if candidates else math.nextafter(1.0, math.inf)
    assert takeover_threshold(records, floor=floor, target_precision=target) == expected
