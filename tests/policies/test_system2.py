"""System 2 methods, driven by a scripted LM: the calls each method builds, and how it votes."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import pytest

from policies.system2 import (
    METHODS,
    Auto,
    BranchSolveMerge,
    ChainOfThought,
    ProgramAided,
    RephraseAndRespond,
    System2Attention,
    UnknownMethodError,
    format_judge_query,
    make_method,
    parse_judge_query,
)
from policies.system2.bsm import parse_criteria
from policies.system2.pal import STOP, extract_program
from policies.system2.prompts import PLACEHOLDERS, TEMPLATES, template_problems
from tests.fakes import Gen, ScriptedLM, user_text

# --- registry --------------------------------------------------------------------------------------


# What the agent passes every method it builds by name (agent.loop); a method that runs programs also
# takes an executor, given here as one that "runs" any program to 4.
AGENT_KWARGS = {"prompts": None, "temperature": 0.5, "top_k": 10, "max_new_tokens": 32}
SUM_AS_JUDGE_QUERY = format_judge_query("What is 2 + 2?", "4", "5")  # also reads as a plain question


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_is_built_by_name_and_solves_through_the_lm(name):
    kwargs = dict(AGENT_KWARGS)
    if "executor" in inspect.signature(METHODS[name]).parameters:
        kwargs["executor"] = lambda codes: [Result(True, 4) for _ in codes]
    if name == "auto":  # made of two methods, as the runtime builds it: programs first, then a prompted one
        executor = lambda codes: [Result(True, 4) for _ in codes]  # noqa: E731
        method = Auto(make_method("pal", executor=executor, **AGENT_KWARGS), make_method("cot", **AGENT_KWARGS))
    else:
        method = make_method(name, **kwargs)
    lm = ScriptedLM("answer = 4\nAnswer: 4")
    result = method.solve(SUM_AS_JUDGE_QUERY, lm, k=3, threshold=0.5)

    # what the agent records as the answer's method (auto: the method whose answer it is)
    assert result.method == (result.extra["tried"][-1] if name == "auto" else name)
    assert len(result.samples) == 3 and sum(result.decision.votes.values()) == 3
    assert result.answer is None or result.answer in result.decision.votes
    # the model is reached only through the LM, and the cost reported is exactly what it served
    assert result.calls == len(lm.calls) > 0 and result.tokens == lm.tokens
    sampled = [c for c in lm.calls if c.temperature > 0]  # (a USC choice is a greedy call of its own)
    assert sampled and all((c.temperature, c.top_k, c.max_new_tokens) == (0.5, 10, 32) for c in sampled)


def test_make_method_passes_a_method_its_own_parameters():
    lm = ScriptedLM("Answer: 4")
    make_method("rar", variant="2step").solve("2+2?", lm, k=2)
    assert len(lm.batches) == 2  # rephrase, then respond
    with pytest.raises(TypeError):
        make_method("cot", variant="2step")


def test_unknown_method_is_a_value_error_naming_every_known_one():
    with pytest.raises(UnknownMethodError) as info:
        make_method("tot")
    assert isinstance(info.value, ValueError)  # the agent reports it as a configuration error
    assert "'tot'" in str(info.value) and all(name in str(info.value) for name in METHODS)


def test_prompt_overrides_merge_over_defaults_and_reject_unknown_names():
    cot = ChainOfThought(prompts={"user": "Q: {query}\nReason, then 'Answer: X'."})
    lm = ScriptedLM(["Answer: 4"])
    cot.sample("2+2?", lm, 1)
    assert user_text(lm.calls[0]) == "Q: 2+2?\nReason, then 'Answer: X'."
    with pytest.raises(KeyError, match="usr"):
        ChainOfThought(prompts={"usr": "{query}"})


# --- template checks -------------------------------------------------------------------------------


def _run_with_templates(name: str, prompts: dict[str, str]) -> list[str]:
    """Run method ``name`` (every stage of it) with ``prompts``; the texts of every message it sent."""

    def respond(call, i):
        return "1. Accuracy\n2. Clarity" if "<bsm.branch>" in user_text(call) else "answer = 1\nVerdict: A"

    lm = ScriptedLM(respond)
    if name == "rar":
        for variant in ("1step", "2step"):
            RephraseAndRespond(variant=variant, prompts=prompts).solve("q?", lm, k=2)
    elif name == "bsm":
        BranchSolveMerge(prompts=prompts).solve(JUDGE_QUERY, lm, k=2)
    elif name == "pal":
        ProgramAided(executor=FakeExecutor({"answer = 1": Result(True, 1)}), prompts=prompts).solve("q?", lm, k=2)
    else:
        make_method(name, prompts=prompts).solve("q?", lm, k=2)
    return [content for call in lm.calls for _, content in call.messages]


@pytest.mark.parametrize("name", sorted(TEMPLATES))  # auto has no templates: it runs pal's and its fallback's
def test_placeholders_are_what_each_method_formats_its_templates_with(name):
    """Each template, overridden to use every placeholder ``PLACEHOLDERS`` lists for it, is sent and filled."""
    assert set(TEMPLATES[name]) == {"system", *PLACEHOLDERS[name]}
    prompts = {t: f"<{name}.{t}> " + " ".join("{" + p + "}" for p in ps) for t, ps in PLACEHOLDERS[name].items()}
    sent = "\n".join(_run_with_templates(name, prompts))
    for template in PLACEHOLDERS[name]:
        assert f"<{name}.{template}>" in sent
    assert "{" not in sent.replace("{{", "")  # every placeholder was filled


def test_default_templates_all_format():
    assert template_problems() == []
    assert template_problems({"cot": {}, "pal": {"system": "Braces {as written} in a system turn are fine."}}) == []
    assert template_problems({"cot": {"user": 'Reply as JSON: {{"answer": ...}} to {query}'}}) == []


@pytest.mark.parametrize(
    "overrides, name, words",
    [
        ({"cot": {"user": "Q: {question}"}}, "cot.user", ["{question}", "{query}"]),
        ({"bsm": {"branch": "{question} in {n} criteria"}}, "bsm.branch", ["{n}", "{question}, {num_criteria}"]),
        ({"s2a": {"respond": "{query}"}}, "s2a.respond", ["{query}", "{context}"]),  # only the rewrite has it
        ({"rar": {"respond": "Reply {query"}}, "rar.respond", ["not a valid template"]),
        ({"pal": {"user": "{} {query}"}}, "pal.user", ["not a valid template"]),
        ({"cot": {"usr": "{query}"}}, "cot.usr", ["not a template of cot", "system, user"]),
        ({"cot": {"user": 3}}, "cot.user", ["must be a string"]),
        ({"cott": {"user": "{query}"}}, "cott", ["not a System 2 method", "bsm, cot, direct, pal, rar, s2a"]),
        ({"rar": "Rephrase {query}"}, "rar", ["must be a table", "one_step"]),
    ],
)
def test_template_problems_name_the_template(overrides, name, words):
    [(where, problem)] = template_problems(overrides)
    assert where == name
    for word in words:
        assert word in problem


# --- CoT -------------------------------------------------------------------------------------------


def test_cot_samples_k_in_one_call_and_votes():
    lm = ScriptedLM(["47 + 38 = 85.\nAnswer: 85", "Answer: 85.0", "Answer: 84", "I am not sure."])
    result = ChainOfThought(answer_kind="number").solve("What is 47 + 38?", lm, k=8, threshold=0.5)
    assert len(lm.batches) == 1 and len(lm.calls) == 1
    call = lm.calls[0]
    assert call.n == 8 and "step by step" in user_text(call) and "What is 47 + 38?" in user_text(call)
    assert [s.answer for s in result.samples] == ["85", "85", "84", None] * 2
    assert result.calls == 1 and result.tokens == 8 * 3
    assert result.decision.votes == {"85": 4, "84": 2, "<none>": 2}
    assert result.answer == "85" and result.decision.accepted and result.decision.agreement == 0.5


def test_cot_rejects_below_threshold():
    lm = ScriptedLM(["Answer: yes", "Answer: no"])
    result = ChainOfThought(answer_kind="yesno").solve("Is it?", lm, k=4, threshold=0.75)
    assert not result.decision.accepted


def test_lm_returning_wrong_number_of_generations_is_an_error():
    def short_lm(calls):
        return [[Gen("Answer: 1")] for _ in calls]

    with pytest.raises(ValueError, match="generations"):
        ChainOfThought().sample("q", short_lm, 3)


# --- RaR -------------------------------------------------------------------------------------------


def test_rar_one_step_is_one_call():
    lm = ScriptedLM(["Rephrased: what is the sum?\nAnswer: 85"])
    samples, calls = RephraseAndRespond(variant="1step", answer_kind="number").sample("47+38?", lm, 4)
    assert calls == 1 and len(lm.calls) == 1 and lm.calls[0].n == 4
    assert "Rephrase and expand" in user_text(lm.calls[0])
    assert [s.answer for s in samples] == ["85"] * 4


def test_rar_two_step_batches_the_answers():
    def respond(call, i):
        text = user_text(call)
        return f"Rephrasing number {i}" if "(original)" not in text else "Answer: 85"

    lm = ScriptedLM(respond)
    result = RephraseAndRespond(variant="2step", answer_kind="number").solve("47+38?", lm, k=3)
    assert [len(b) for b in lm.batches] == [1, 3]
    first, second = lm.batches
    assert first[0].n == 3
    assert all(c.n == 1 for c in second)
    assert [user_text(c).count(f"Rephrasing number {i}") for i, c in enumerate(second)] == [1, 1, 1]
    assert all("(original) 47+38?" in user_text(c) for c in second)
    assert result.calls == 4 and result.tokens == 3 * (3 + 3)
    assert result.answer == "85" and result.decision.accepted


def test_rar_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        RephraseAndRespond(variant="3step")


# --- S2A -------------------------------------------------------------------------------------------

BIASED = "What is the capital of Australia? I think the answer is Sydney, but I'm not sure."


def s2a_lm(answer: str, usc_pick: str = "1") -> ScriptedLM:
    def respond(call, i):
        text = user_text(call)
        if "Text by user" in text:
            return "What is the capital of Australia?"
        if "most consistent" in text:
            return usc_pick
        return f"It is the capital city.\nAnswer: {answer}"

    return ScriptedLM(respond)


def test_s2a_rewrites_then_answers_each_rewrite():
    lm = s2a_lm("Canberra")
    result = System2Attention(answer_kind="text").solve(BIASED, lm, k=4)
    rewrite, *rest = lm.batches
    assert len(rewrite) == 1 and rewrite[0].n == 4 and BIASED in user_text(rewrite[0])
    respond = rest[0]
    assert len(respond) == 4 and all(c.n == 1 for c in respond)
    assert all("I think" not in user_text(c) for c in respond)
    assert [s.extra["context"] for s in result.samples] == ["What is the capital of Australia?"] * 4
    # Free-form: universal self-consistency is one more call, counted with its tokens.
    assert len(lm.batches) == 3 and "most consistent" in user_text(lm.batches[2][0])
    assert result.decision.filter == "universal_self_consistency"
    assert result.answer == "canberra" and result.decision.accepted
    assert result.calls == 1 + 4 + 1 and result.tokens == 4 * 6 + 3


def test_s2a_uses_majority_vote_for_closed_answers():
    lm = s2a_lm("yes")
    result = System2Attention(answer_kind="yesno").solve("Is Canberra the capital? I think not.", lm, k=4)
    assert len(lm.batches) == 2
    assert result.decision.filter == "self_consistency" and result.answer == "yes"
    assert result.calls == 5


def test_s2a_empty_rewrite_falls_back_to_the_query():
    lm = ScriptedLM(lambda call, i: "" if "Text by user" in user_text(call) else "Answer: no")
    samples, _ = System2Attention(answer_kind="yesno").sample("Is it raining?", lm, 2)
    assert all("Is it raining?" in user_text(c) for c in lm.batches[1])
    assert [s.answer for s in samples] == ["no", "no"]


# --- BSM -------------------------------------------------------------------------------------------

QUESTION = "What is the capital of France?"
JUDGE_QUERY = format_judge_query(QUESTION, "Paris.", "Lyon, I believe.")


def test_judge_query_round_trips():
    q = parse_judge_query(JUDGE_QUERY)
    assert q == (QUESTION, "Paris.", "Lyon, I believe.")
    assert parse_judge_query('{"question": "Q?", "response_a": "a", "response_b": "b"}') == ("Q?", "a", "b")
    multi = "[Question]\nline 1\nline 2\n\n[Response A]\n  a\n[Response B]\nb [Response A] inline\n"
    assert parse_judge_query(multi) == ("line 1\nline 2", "a", "b [Response A] inline")


@pytest.mark.parametrize(
    "bad",
    [
        "What is better, A or B?",
        "[Question]\nQ\n[Response B]\nb\n[Response A]\na",
        "[Question]\nQ\n[Response A]\na",
        "[Question]\nQ\n[Response A]\n\n[Response B]\nb",
        "preamble\n[Question]\nQ\n[Response A]\na\n[Response B]\nb",
        "[Question]\nQ\n[Response A]\na\n[Response B]\nb\n[Response B]\nc",
        '{"question": "Q?", "response_a": "a"}',
    ],
)
def test_bad_judge_queries_raise(bad):
    with pytest.raises(ValueError):
        parse_judge_query(bad)


def test_criteria_parsing():
    text = "Here are the criteria:\n1. Accuracy\n2) accuracy\n- **Relevance**\n* Clarity of writing\n5. Depth"
    assert parse_criteria(text, 3) == ["Accuracy", "Relevance", "Clarity of writing"]
    assert parse_criteria("", 3) == []


def judge_lm(prefer: Callable[[str, str], str]) -> ScriptedLM:
    """A judge that, given the prompt's Response A and B texts, says ``prefer(a, b)``."""

    def respond(call, i):
        text = user_text(call)
        if "List 3 short criteria" in text:
            return "1. Accuracy\n2. Relevance\n3. Clarity"
        q = text.split("[Response A]\n")[1]
        a, rest = q.split("\n\n[Response B]\n")
        b = rest.split("\n\n")[0]
        return f"Reasoning.\nVerdict: {prefer(a, b)}"

    return ScriptedLM(respond)


def test_bsm_builds_branch_solve_merge_in_three_batches():
    lm = judge_lm(lambda a, b: "A" if a == "Paris." else "B")
    k = 4
    result = BranchSolveMerge().solve(JUDGE_QUERY, lm, k=k)
    branch, solve, merge = lm.batches
    assert len(branch) == 1 and branch[0].n == 1 and QUESTION in user_text(branch[0])
    assert len(solve) == 2 * 3 and all(c.n == k for c in solve)
    criteria_seen = {c for call in solve for c in ("Accuracy", "Relevance", "Clarity") if c in user_text(call)}
    assert criteria_seen == {"Accuracy", "Relevance", "Clarity"}
    # both orders: half the solve calls show "Paris." as Response A, half as Response B
    assert sum("[Response A]\nParis." in user_text(c) for c in solve) == 3
    assert sum("[Response B]\nParis." in user_text(c) for c in solve) == 3
    assert len(merge) == 2 * k and all(c.n == 1 for c in merge)
    assert all(user_text(c).count("Verdict: ") >= 3 for c in merge)
    assert result.calls == 1 + 6 + 2 * k
    assert [(s.answer, s.extra["swapped"]) for s in result.samples] == [("A", "B")] * k
    assert result.decision.filter == "perturbation"
    assert result.answer == "A" and result.decision.accepted and result.decision.agreement == 1.0


def test_bsm_rejects_a_judge_that_follows_position():
    lm = judge_lm(lambda a, b: "A")  # always the first response, whatever it is
    result = BranchSolveMerge().solve(JUDGE_QUERY, lm, k=4)
    assert [(s.answer, s.extra["swapped"]) for s in result.samples] == [("A", "A")] * 4
    assert not result.decision.accepted and result.answer is None


def test_bsm_unparsable_branch_and_verdicts():
    def respond(call, i):
        text = user_text(call)
        if "short criteria" in text:
            return ""
        if "Merge these judgements" in text and "[Response A]\nLyon" in text:
            return "Hard to say."  # no verdict in the swapped order
        return "Verdict: tie"

    lm = ScriptedLM(respond)
    result = BranchSolveMerge(num_criteria=2).solve(JUDGE_QUERY, lm, k=2)
    assert "correctness" in user_text(lm.batches[1][0])  # the default criteria
    assert len(lm.batches[1]) == 2 * 2
    assert [(s.answer, s.extra["swapped"]) for s in result.samples] == [("tie", None)] * 2
    assert result.decision.votes == {"<none>": 2} and not result.decision.accepted


def test_bsm_none_verdict_is_a_none_vote():
    lm = judge_lm(lambda a, b: "whichever")
    result = BranchSolveMerge().solve(JUDGE_QUERY, lm, k=2)
    assert [s.answer for s in result.samples] == [None, None]
    assert result.decision.votes == {"<none>": 2} and not result.decision.accepted


def test_bsm_bad_query_raises_before_any_call():
    lm = ScriptedLM(["x"])
    with pytest.raises(ValueError):
        BranchSolveMerge().solve("Which is better?", lm, k=2)
    assert lm.batches == []


# --- PAL -------------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool
    value: object = None
    error: str | None = None


class FakeExecutor:
    def __init__(self, results: dict[str, Result]):
        self.results = results
        self.batches: list[list[str]] = []

    def __call__(self, codes):
        self.batches.append(list(codes))
        return [self.results.get(c, Result(False, None, "NameError")) for c in codes]


LAST_LETTER = "Take the last letters of the words in 'river cloud' and concatenate them."


@pytest.mark.parametrize(
    "query,family,kind",
    [
        (LAST_LETTER, "last_letter", "text"),
        ("What is 47 + 38?", "arithmetic", "number"),
        ("What is 47 + 38 - 21?", "arithmetic", "number"),
        ("A coin is heads up. Ann flips the coin. Is the coin still heads up?", "coin_flip", "yesno"),
        ("How many legs do 3 spiders have?", "generic", "text"),
        ("Add 47 and 38.", "arithmetic_words", "number"),
        ("What is 47 plus 38?", "arithmetic_words", "number"),
        ("Subtract 9 from 30.", "arithmetic_words", "number"),
        ("Add salt and pepper to the soup.", "generic", "text"),
        ("Add 2 and 3 and 4, then halve it.", "generic", "text"),
    ],
)
def test_pal_picks_family_by_regex(query, family, kind):
    pal = ProgramAided(executor=FakeExecutor({}))
    assert pal.family_for(query) == family and pal.kind_for(family) == kind


def test_pal_explicit_family_and_extra_families():
    extra = {"days": {"match": r"\bdays?\b", "answer_kind": "number", "shots": (("Days in 2 weeks?", "answer = 2 * 7"),)}}
    pal = ProgramAided(executor=FakeExecutor({}), families=extra)
    assert pal.family_for("How many days in 3 weeks?") == "days"
    fixed = ProgramAided(executor=FakeExecutor({}), family="coin_flip")
    assert fixed.family_for(LAST_LETTER) == "coin_flip" and fixed.answer_kind == "yesno"
    with pytest.raises(ValueError, match="unknown PAL family"):
        ProgramAided(executor=FakeExecutor({}), family="chess")
    with pytest.raises(ValueError, match="shot"):
        ProgramAided(executor=FakeExecutor({}), families={"empty": {"shots": ()}})


def test_pal_builds_one_few_shot_call_and_votes_executed_values():
    programs = ["answer = 47 + 38", "```python\nanswer = 85.0 * 1\n```", "answer = 80 + 4", "answer = undefined", ""]
    executor = FakeExecutor({"answer = 47 + 38": Result(True, "85"), "answer = 85.0 * 1": Result(True, 85.0),
                             "answer = 80 + 4": Result(True, 84)})
    lm = ScriptedLM(programs)
    result = ProgramAided(executor=executor).solve("What is 47 + 38?", lm, k=5, threshold=0.4)
    [call] = lm.calls
    assert call.n == 5 and call.stop == STOP
    roles = [r for r, _ in call.messages]
    assert roles[0] == "system" and roles[-1] == "user" and roles.count("assistant") == 3
    assert call.messages[-1][1] == "What is 47 + 38?"
    assert ("assistant", "answer = 47 + 38 - 21") in call.messages  # the arithmetic shots
    # the empty program is not run; all others in one executor call
    assert executor.batches == [["answer = 47 + 38", "answer = 85.0 * 1", "answer = 80 + 4", "answer = undefined"]]
    assert [s.answer for s in result.samples] == ["85", "85", "84", None, None]
    assert [s.extra["error"] for s in result.samples][3:] == ["NameError", "empty program"]
    assert result.answer == "85" and result.decision.accepted and result.calls == 1


def test_pal_values_are_normalised_by_family_kind():
    executor = FakeExecutor({"a()": Result(True, True), "b()": Result(True, "No"), "c()": Result(True, ""),
                             "d()": Result(True, None)})
    lm = ScriptedLM(["a()", "b()", "c()", "d()"])
    samples, _ = ProgramAided(executor=executor).sample("A coin is heads up. Is the coin still heads up?", lm, 4)
    assert [s.answer for s in samples] == ["yes", "no", None, None]


def test_pal_executor_with_no_programs_is_not_called():
    executor = FakeExecutor({})
    samples, calls = ProgramAided(executor=executor).sample("What is 1 + 1?", ScriptedLM(["\n"]), 2)
    assert executor.batches == [] and [s.answer for s in samples] == [None, None]


@pytest.mark.parametrize(
    "text,program",
    [
        ("answer = 1", "answer = 1"),
        ("answer = 1\n\nThis program adds.", "answer = 1"),
        ("Here it is:\n```python\nx = 2\nanswer = x\n```\nDone.", "x = 2\nanswer = x"),
        ("```\nanswer = 3", "answer = 3"),
        ("answer = 4<|im_end|>", "answer = 4"),
    ],
)
def test_extract_program(text, program):
    assert extract_program(text) == program


def test_pal_with_real_sandbox():
    sandbox = pytest.importorskip("agent.sandbox", reason="agent.sandbox (run_programs) is not written yet")
    programs = [
        'words = "river cloud".split()\nanswer = "".join(word[-1] for word in words)',
        'story = "Ann flips the coin."\nflips = story.count(" flips the coin")\nanswer = "yes" if flips % 2 == 0 else "no"',
        "answer = 1 / 0",
        "while True:\n    pass",
    ]
    lm = ScriptedLM(programs)
    pal = ProgramAided(executor=lambda codes: sandbox.run_programs(codes, timeout_s=0.5), family="last_letter")
    samples, _ = pal.sample(LAST_LETTER, lm, 4)
    assert [s.answer for s in samples] == ["rd", "no", None, None]
    assert "ZeroDivisionError" in samples[2].extra["error"]


# --- what a program must do to count, and the auto method -------------------------------------------------
@pytest.mark.parametrize("program,computes", [
    ("answer = 5", False),
    ("answer = 'Paris'", False),
    ("x = 5\nanswer = x", False),
    ("answer = -3", False),
    ("answer = 47 + 38", True),
    ("words = 'apple house'.split()\nanswer = ''.join(w[-1] for w in words)", True),
    ("answer = len('banana')", True),
    ("answer = sorted([5, 2, 9])", True),
    ("for i in range(3):\n    pass\nanswer = i", True),
    ("this is not python", True),  # left to the sandbox, which reports the syntax error
])
def test_a_program_that_only_assigns_literals_computes_nothing(program, computes):
    from policies.system2.pal import computes as check

    assert check(program) is computes


def test_pal_does_not_count_literal_answers_as_votes():
    """'What is 2+2? The program is: answer = 5' must not become an accepted example."""
    executor = FakeExecutor({"answer = 5": Result(True, 5), "answer = 2 + 2": Result(True, 4)})
    lm = ScriptedLM(["answer = 5", "answer = 5", "answer = 5", "answer = 2 + 2"])
    result = ProgramAided(executor=executor).solve("What is 2+2? The program is: answer = 5", lm, k=4)
    assert [s.answer for s in result.samples] == [None, None, None, "4"]
    assert "computes nothing" in result.samples[0].extra["error"]
    assert result.answer == "4" and not result.decision.accepted  # one real vote of four is no consensus


class _Fixed:
    """A method whose solve returns a scripted decision and counts its calls."""

    def __init__(self, name: str, answer: str | None, accepted: bool, tokens: int) -> None:
        self.name, self.answer_kind, self.runs = name, "text", 0
        self._answer, self._accepted, self._tokens = answer, accepted, tokens

    def solve(self, query, lm, k=8, threshold=0.75):
        from policies.consistency import Decision
        from policies.system2 import System2Result

        self.runs += 1
        decision = Decision(self._answer, self._accepted, {self._answer or "<none>": k}, 1.0, "self_consistency")
        return System2Result(self.name, [], decision, calls=1, tokens=self._tokens)


def test_auto_keeps_agreeing_programs_and_asks_nothing_else():
    from policies.system2 import Auto

    first, fallback = _Fixed("pal", "85", True, 40), _Fixed("cot", "84", True, 300)
    result = Auto(first, fallback).solve("What is 47 + 38?", ScriptedLM(["x"]), k=4)
    assert (result.method, result.answer, result.tokens, result.extra["tried"]) == ("pal", "85", 40, ["pal"])
    assert fallback.runs == 0


def test_auto_asks_the_fallback_when_programs_do_not_agree_and_counts_both():
    from policies.system2 import Auto

    first, fallback = _Fixed("pal", None, False, 40), _Fixed("cot", "Paris", True, 300)
    result = Auto(first, fallback).solve("What is the capital of France?", ScriptedLM(["x"]), k=4)
    assert (result.method, result.answer, result.decision.accepted) == ("cot", "Paris", True)
    assert (result.tokens, result.calls, result.extra["tried"]) == (340, 2, ["pal", "cot"])


def test_auto_without_fallback_returns_the_programs_verdict():
    from policies.system2 import Auto

    result = Auto(_Fixed("pal", None, False, 40)).solve("Who are you?", ScriptedLM(["x"]), k=4)
    assert (result.method, result.answer, result.decision.accepted) == ("pal", None, False)


@pytest.mark.parametrize("query,program,reads", [
    ("How many letters are in the word 'banana'?", "answer = len('banana')", True),
    ("Sort these numbers: 5, 2, 9, 1.", "answer = sorted([5, 2, 9, 1])", True),
    ("What is the capital of France?", "answer = 'Paris'.capitalize()", False),
    ("Who wrote Romeo and Juliet?", "answer = ' '.join(['William', 'Shakespeare'])", False),
    ("What is 2+2? The program is: answer = 2 + 3", "answer = 2 + 3", False),  # copied from the question
    ("What is 7 squared?", "answer = 7 ** 2", True),
])
def test_a_program_for_an_unknown_family_must_compute_on_the_question(query, program, reads):
    from policies.system2.pal import reads_the_question

    assert reads_the_question(program, query) is reads


def test_pal_ignores_knowledge_written_as_code_for_general_questions():
    executor = FakeExecutor({"answer = 'Paris'.capitalize()": Result(True, "Paris")})
    lm = ScriptedLM(["answer = 'Paris'.capitalize()"] * 4)
    result = ProgramAided(executor=executor).solve("What is the capital of France?", lm, k=4)
    assert result.answer is None and not result.decision.accepted
    assert "question's data" in result.samples[0].extra["error"]
