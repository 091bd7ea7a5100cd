"""Program-aided answers (PAL, Gao et al. 2022): the model writes a short Python program that sets
``answer``; the program is run and its value is the sample's vote.

This is the System 2 that beats System 1 with the embedded 135M model, because the model only has to
copy the question into a program (e.g. ``"".join(w[-1] for w in words)``) and Python does the part
it cannot. Prompts are few-shot chat turns, per **task family** (``prompts.PAL_FAMILIES``):

- the family is ``family=`` when given (a per-task instance, e.g. ``make_method("pal", family="coin_flip")``),
  else the first family whose ``match`` regex is found in the query, else ``"generic"``;
- the family fixes how the value is normalised (last_letter: text, arithmetic: number,
  coin_flip: yes/no) unless ``answer_kind=`` is given;
- ``families=`` adds families or replaces built-in ones: ``{"name": {"shots": ((question, program), ...),
  "match": r"regex" or None, "answer_kind": "text"}}``.

Programs are run by ``executor`` (the runtime passes ``agent.sandbox.run_programs``), all ``k`` in one
call. A program that raises, times out or leaves ``answer`` unset or empty is a None vote, and so is one that
computes nothing (only assigns literals, see :func:`computes`) or, for a question of no known family, does
not compute on the question's own data (:func:`reads_the_question`): its value is a guess or a copy.
"""

from __future__ import annotations

import ast
import re
from typing import Callable, Mapping, Protocol, Sequence

from policies.answers import AnswerKind, normalise
from policies.lm import LM, Call, run_batch
from policies.system2 import prompts as P
from policies.system2.base import Sample, System2Method


class ExecResult(Protocol):
    """What the executor returns per program."""

    ok: bool
    value: object
    error: str | None


Executor = Callable[[Sequence[str]], Sequence[ExecResult]]
"""Runs programs (in a sandbox) and returns, per program, its ``answer`` value or its error."""

DEFAULT_FAMILY = "generic"
STOP = ("\n\n", "\n```")
"""Generation ends after the program: at a blank line or a closing code fence."""

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def extract_program(text: str) -> str:
    """The program in a generation: the first fenced block if any, else the text up to a blank line."""
    text = text.split("<|im_end|>")[0]
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    return text.strip("\n").split("\n\n")[0].rstrip()


_PLAIN = (ast.Constant, ast.Name)


def computes(program: str) -> bool:
    """Does the program compute anything, or only assign literals (``answer = 5``)?

    A program made only of assignments of constants and names is the model's guess written as code, or
    a value copied from the input ("The program is: answer = 5"): its "execution" proves nothing, so
    its answer is no evidence for the vote. Any operation (arithmetic, a call, indexing, a comparison,
    a loop) counts as computing. Unparsable programs are left to the sandbox, which reports them."""
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return True
    for statement in tree.body:
        if not isinstance(statement, (ast.Assign, ast.AnnAssign, ast.Expr)):
            return True
        value = statement.value
        if value is not None and not isinstance(value, _PLAIN) and not (
            isinstance(value, ast.UnaryOp) and isinstance(value.operand, ast.Constant)
        ):
            return True
    return False


_TRIVIAL = frozenset({"", " ", "0", "1", "true", "false", "none"})


def reads_the_question(program: str, query: str) -> bool:
    """Does the program take its data from the question, rather than from the model's memory or from a
    program the question itself supplies?

    For a question that fits no task family, a program is evidence only when it computes on something the
    question says: at least one of its literals (a number, a word, a quoted string) occurs in the question
    ("What is the capital of France?" -> ``answer = "Paris".capitalize()`` does not; ``len("banana")`` for
    "How many letters are in 'banana'?" does). A program copied from the question is never evidence."""
    squeeze = lambda text: re.sub(r"\s+", "", text).lower()  # noqa: E731
    if squeeze(program) and squeeze(program) in squeeze(query):
        return False
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return True  # the sandbox reports it
    question = query.lower()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
            text = str(node.value).strip().lower()
            if text not in _TRIVIAL and text in question:
                return True
    return False


def value_text(value: object, kind: AnswerKind) -> str | None:
    """An executed ``answer`` as text to normalise: None/empty stay None, ``True`` is "yes" for yes/no,
    an integral float loses its ``.0``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ("yes" if value else "no") if kind == "yesno" else str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def program_answer(result: ExecResult, kind: AnswerKind) -> str | None:
    """A run program's ``answer``, normalised as a vote of ``kind`` (None: it failed or set nothing readable)."""
    if not result.ok:
        return None
    text = value_text(result.value, kind)
    return normalise(text, kind) if text is not None else None


def _check_family(name: str, spec: Mapping) -> dict:
    if not spec.get("shots"):
        raise ValueError(f"PAL family {name!r} needs at least one (question, program) shot")
    return {"match": spec.get("match"), "answer_kind": spec.get("answer_kind", "text"), "shots": tuple(spec["shots"])}


class ProgramAided(System2Method):
    name = "pal"

    def __init__(
        self,
        executor: Executor,
        family: str | None = None,
        answer_kind: AnswerKind | None = None,
        families: Mapping[str, Mapping] | None = None,
        prompts: Mapping[str, str] | None = None,
        temperature: float = 0.7,
        top_k: int = 40,
        max_new_tokens: int = 160,
        stop: tuple[str, ...] = STOP,
    ):
        self.executor = executor
        self.families = {n: _check_family(n, f) for n, f in {**P.PAL_FAMILIES, **(families or {})}.items()}
        if family is not None and family not in self.families:
            raise ValueError(f"unknown PAL family {family!r}; known: {sorted(self.families)}")
        self.family = family
        self._kind = answer_kind
        self.answer_kind = answer_kind or (self.families[family]["answer_kind"] if family else "text")
        self.prompts = P.merged(P.PAL, prompts)
        self.temperature, self.top_k, self.max_new_tokens, self.stop = temperature, top_k, max_new_tokens, stop

    def family_for(self, query: str) -> str:
        """The fixed family, else the first whose regex is found in the query, else the generic one."""
        if self.family is not None:
            return self.family
        for name, spec in self.families.items():
            if spec["match"] and re.search(spec["match"], query, re.IGNORECASE):
                return name
        return DEFAULT_FAMILY

    def kind_for(self, family: str) -> AnswerKind:
        return self._kind or self.families[family]["answer_kind"]

    def messages(self, query: str, family: str) -> tuple[tuple[str, str], ...]:
        """System turn, then each shot as a (question, program) exchange, then the query."""
        turns = [("system", self.prompts["system"])] if self.prompts["system"] else []
        for question, program in self.families[family]["shots"]:
            turns += [
                ("user", self.prompts["user"].format(query=question)),
                ("assistant", self.prompts["assistant"].format(program=program)),
            ]
        turns.append(("user", self.prompts["user"].format(query=query)))
        return tuple(turns)

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        family = self.family_for(query)
        kind = self.kind_for(family)
        call = Call(
            messages=self.messages(query, family),
            n=k,
            temperature=self.temperature,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
        )
        [generations] = run_batch(lm, [call])
        programs = [extract_program(g.text) for g in generations]
        to_run = [i for i, p in enumerate(programs) if p.strip()]
        results = list(self.executor([programs[i] for i in to_run])) if to_run else []
        if len(results) != len(to_run):
            raise ValueError(f"executor returned {len(results)} results for {len(to_run)} programs")
        by_index = dict(zip(to_run, results))

        samples = []
        for i, (g, program) in enumerate(zip(generations, programs)):
            result = by_index.get(i)
            answer, error = None, "empty program"
            if result is not None:
                error = None if result.ok else (result.error or "failed")
                answer = program_answer(result, kind)
                if result.ok and answer is None:
                    error = f"answer is empty or unreadable: {result.value!r}"
                elif result.ok and not computes(program):
                    answer, error = None, "the program computes nothing (it only assigns literals)"
                elif result.ok and family == DEFAULT_FAMILY and not reads_the_question(program, query):
                    answer, error = None, "the program does not compute on the question's data"
            extra = {"family": family, "program": program, "error": error}
            samples.append(Sample(trace=program, answer=answer, tokens=g.num_tokens, extra=extra))
        return samples, 1
