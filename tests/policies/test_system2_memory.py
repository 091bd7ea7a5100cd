"""The System 2 memory: skip System 2 where it never paid off for similar inputs, and only there."""

import pytest

from policies.system2_memory import System2Memory

CAPITALS = [f"What is the capital of {c}?" for c in ("France", "Peru", "Japan", "Chile", "Kenya", "Nepal")]
SUMS = [f"What is {a} + {b}?" for a, b in ((12, 30), (47, 38), (5, 9), (61, 22), (70, 13))]


def test_an_input_like_earlier_failures_is_skipped_and_others_are_not():
    memory = System2Memory(min_evidence=4, explore=0.0)
    for question in CAPITALS[:4]:
        memory.add(question, "auto", paid_off=False)
    for question in SUMS[:4]:
        memory.add(question, "auto", paid_off=True)
    verdict = memory.judge(CAPITALS[5], "auto")
    assert verdict.skip and verdict.evidence == 4 and verdict.paid_off == 0
    sums = memory.judge(SUMS[4], "auto")
    assert not sums.skip and sums.paid_off == sums.evidence >= 4
    unseen = memory.judge("Sort these words: pear, apple, fig.", "auto")
    assert not unseen.skip and unseen.evidence == 0


def test_too_little_evidence_or_enough_successes_keep_system2():
    memory = System2Memory(min_evidence=4, min_yield=0.2, explore=0.0)
    for question in CAPITALS[:3]:
        memory.add(question, "auto", paid_off=False)
    assert not memory.judge(CAPITALS[5], "auto").skip  # three failures are not yet evidence
    memory.add(CAPITALS[3], "auto", paid_off=True)
    memory.add(CAPITALS[4], "auto", paid_off=False)
    verdict = memory.judge(CAPITALS[5], "auto")  # 1 of 5 paid off: a yield of 0.2 is enough to keep trying
    assert (verdict.evidence, verdict.paid_off, verdict.skip) == (5, 1, False)


def test_outcomes_are_kept_per_method():
    memory = System2Memory(min_evidence=4, explore=0.0)
    for question in CAPITALS[:4]:
        memory.add(question, "auto", paid_off=False)
    assert memory.judge(CAPITALS[5], "auto").skip
    assert not memory.judge(CAPITALS[5], "teacher:direct").skip  # another method has not failed here


def test_exploration_still_runs_system2_on_a_share_of_the_skips():
    memory = System2Memory(min_evidence=4, explore=0.25, seed=3)
    for question in CAPITALS[:4]:
        memory.add(question, "auto", paid_off=False)
    verdicts = [memory.judge(CAPITALS[5], "auto") for _ in range(400)]
    explored = sum(v.explored for v in verdicts)
    assert all(v.skip != v.explored for v in verdicts)
    assert 60 <= explored <= 140  # ~100 of 400 at 0.25


def test_only_the_newest_outcomes_are_kept():
    memory = System2Memory(min_evidence=4, explore=0.0, capacity=4)
    for question in CAPITALS[:4]:
        memory.add(question, "auto", paid_off=False)
    for question in CAPITALS[:4]:
        memory.add(question, "auto", paid_off=True)  # System 2 learned to answer these (a teacher came)
    assert len(memory) == 4
    verdict = memory.judge(CAPITALS[5], "auto")
    assert not verdict.skip and verdict.paid_off == 4


@pytest.mark.parametrize("kwargs", [{"min_similarity": 0.0}, {"min_evidence": 9, "neighbours": 8},
                                    {"explore": 1.5}, {"capacity": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        System2Memory(**kwargs)


def test_a_question_asked_again_after_system2_failed_on_it_is_skipped_at_once():
    memory = System2Memory(min_evidence=4, explore=0.0)
    memory.add(CAPITALS[0], "auto", paid_off=False)
    again = memory.judge(CAPITALS[0], "auto")
    assert again.skip and again.repeated and again.evidence == 1
    similar = memory.judge(CAPITALS[1], "auto")  # a similar question still needs the usual evidence
    assert not similar.skip and not similar.repeated
    assert memory.judge("what is  the capital of FRANCE?", "auto").repeated  # case and spacing aside
    memory.add(SUMS[1], "auto", paid_off=False)  # the features fold digits; the same-text rule does not
    assert memory.judge(SUMS[1], "auto").skip and not memory.judge(SUMS[2], "auto").skip
    memory.add(SUMS[0], "auto", paid_off=False)
    memory.add(SUMS[0], "auto", paid_off=True)
    assert not memory.judge(SUMS[0], "auto").skip  # it paid off once: worth another run
    twice = System2Memory(min_evidence=4, repeat_failures=2, explore=0.0)
    twice.add(CAPITALS[0], "auto", paid_off=False)
    assert not twice.judge(CAPITALS[0], "auto").skip
    twice.add(CAPITALS[0], "auto", paid_off=False)
    assert twice.judge(CAPITALS[0], "auto").skip
    never = System2Memory(min_evidence=4, repeat_failures=0, explore=0.0)
    never.add(CAPITALS[0], "auto", paid_off=False)
    assert not never.judge(CAPITALS[0], "auto").skip
    ring = System2Memory(min_evidence=4, explore=0.0, capacity=2)  # forgotten with the ring's oldest outcome
    ring.add(CAPITALS[0], "auto", paid_off=False)
    ring.add(SUMS[0], "auto", paid_off=True)
    ring.add(SUMS[1], "auto", paid_off=True)
    assert not ring.judge(CAPITALS[0], "auto").skip


def test_a_queue_is_judged_as_a_whole_as_each_input_alone_and_ranked_by_expected_yield():
    memory = System2Memory(min_evidence=4, explore=1.0)  # judge() explores every would-be skip; judge_many never
    for question in CAPITALS[:4]:
        memory.add(question, "auto", paid_off=False)
    for question in SUMS[:3]:
        memory.add(question, "auto", paid_off=True)
    memory.add("Count the letters in 'pear'.", "auto", paid_off=False)
    waiting = [CAPITALS[5], "Sort these words: pear, apple, fig.", SUMS[4], "Count the letters in 'plum'.", CAPITALS[0]]
    verdicts = memory.judge_many(waiting, "auto")
    for text, verdict in zip(waiting, verdicts):
        alone = memory.judge(text, "auto")
        assert (verdict.skip, verdict.evidence, verdict.paid_off, verdict.repeated) == (
            alone.explored, alone.evidence, alone.paid_off, alone.repeated)
        assert not verdict.explored
    assert [v.skip for v in verdicts] == [True, False, False, False, True]
    assert verdicts[4].repeated  # asked before, and System 2 failed on it
    # sums 3 of 3: 0.8; a kind never seen: 0.5; counting 0 of 1: 0.33; capitals 0 of 4: 0.17
    assert [round(v.expected_yield, 2) for v in verdicts[:4]] == [0.17, 0.5, 0.8, 0.33]
    assert memory.judge_many(waiting, "teacher:pal") == [memory.judge(CAPITALS[5], "teacher:pal")] * 5
    assert memory.judge_many([], "auto") == []
