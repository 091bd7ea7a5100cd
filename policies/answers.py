"""Reading final answers out of model text, and putting them in one canonical form.

Distillation trains System 1 on (input -> final answer) and the consistency filters vote on final
answers, so two things must hold: an answer that is the same must *look* the same ("85", "85.0",
"**85**." all become "85"), and text that does not clearly state an answer must not count as a
vote at all. Every function here therefore prefers ``None`` (unparsable) over a guess: a ``None``
vote counts *against* agreement, a wrong guess would count *for* a wrong answer.

Two entry points:

- :func:`extract_final` reads System 2 outputs (reasoning, then a final-answer line).
- :func:`normalise` reads direct answers (System 1 outputs, training targets, sandbox values).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

AnswerKind = Literal["text", "yesno", "number", "choice", "verdict"]
"""What sort of answer a task has; it decides how answers are normalised and compared."""

MAX_TEXT_ANSWER_CHARS = 200
"""A "final answer" longer than this is a paragraph, not an answer: it is not a usable vote."""

# --- final-answer markers --------------------------------------------------------------------------
# Each pattern captures the answer after one explicit marker. The *last* marker in the text wins:
# models often restate an intermediate result as "the answer is ..." before correcting it.
_MARKERS: tuple[re.Pattern[str], ...] = (
    # "Answer: X", "Final answer: X", "Final verdict: X" starting a line (after list marks) or a sentence.
    re.compile(
        r"(?:^[ \t>*\-\d.)]*|(?<=[.!?] ))(?:the\s+)?(?:final\s+)?(?:answer|verdict)\s*[:：]\s*(?P<x>.+?)\s*$",
        re.IGNORECASE | re.MULTILINE,
    ),
    # "... the answer is X", "The final answer is: X" anywhere in a line.
    re.compile(
        r"\b(?:final\s+)?answer\s+is\s*[:：]?\s*(?P<x>.+?)\s*$", re.IGNORECASE | re.MULTILINE
    ),
    # GSM8k style "#### X".
    re.compile(r"^\s*####\s*(?P<x>.+?)\s*$", re.MULTILINE),
    # LaTeX "\boxed{X}".
    re.compile(r"\\boxed\{(?P<x>[^{}]*)\}"),
)
_PROSE_MARKER = _MARKERS[1]
_SENTENCE_END = re.compile(r"(?<=[^\s.])\.\s+(?=[A-Z])")
_PLACEHOLDER = re.compile(r"^<[^<>]*answer[^<>]*>$", re.IGNORECASE)
_MT_BENCH_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def extract_final(text: str, kind: AnswerKind = "text") -> str | None:
    """The normalised final answer stated in a System 2 output, or None if it states none.

    Looks for the last explicit marker ("Answer: X", "Final answer: X", "The answer is X",
    "#### X", "\\boxed{X}"); output without a marker is a rambling, not a vote, so it gives None
    even when some plausible answer appears in it. For verdicts, MT-bench's "[[A]]" / "[[B]]" /
    "[[C]]" (tie) also counts as a marker, since judge prompts ask for exactly that.
    """
    if not text:
        return None
    clean = text.replace("**", "")  # markdown bold around markers or answers
    best: tuple[int, str] | None = None
    for pattern in _MARKERS:
        for match in pattern.finditer(clean):
            value = match.group("x")
            if pattern is _PROSE_MARKER:
                # "So the answer is 172. Let me check." -> "172": in prose the sentence ends the answer.
                value = _SENTENCE_END.split(value, maxsplit=1)[0]
            if best is None or match.start("x") > best[0]:
                best = (match.start("x"), value)
    if kind == "verdict":
        verdicts = list(_MT_BENCH_VERDICT.finditer(clean))
        if verdicts and (best is None or verdicts[-1].start() >= best[0]):
            best = (verdicts[-1].start(), verdicts[-1].group(0))
    if best is None:
        return None
    value = best[1].strip()
    if _PLACEHOLDER.match(value.strip("'\"`*")):
        return None  # the model echoed the prompt's "Answer: <answer>" template
    return normalise(value, kind)


# --- normalisation ---------------------------------------------------------------------------------
_SURROUNDING = " \t\r\n\"'`“”‘’«».,;:!?*_()[]{}<>$"
_WORD = re.compile(r"\w+")
_NUMBER = re.compile(
    r"(?:(?<![\w.)])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w.]\d)|(?<![\w.])\.\d+"
)
_EQUATION = re.compile(r"^[\d\s.,+\-*/×x÷()^]+=\s*(?P<rhs>-?[\d.,]+)\s*\.?$")


def _text(answer: str) -> str | None:
    value = answer.replace("**", "")
    value = re.sub(r"\s+", " ", value).strip(_SURROUNDING).lower()
    if not value or len(value) > MAX_TEXT_ANSWER_CHARS:
        return None
    return value


def _yesno(answer: str) -> str | None:
    words = [w.lower() for w in _WORD.findall(answer)]
    if not words:
        return None
    first = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}.get(words[0])
    if first:
        return first
    said = {w for w in words if w in ("yes", "no")}
    return said.pop() if len(said) == 1 else None


def _canonical_number(raw: str) -> str | None:
    try:
        value = Decimal(raw.replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        return "0"  # also turns "-0" and "0.00" into "0"
    return format(value.normalize(), "f")


def _number(answer: str) -> str | None:
    value = answer.replace("**", "").strip().rstrip(".")
    equation = _EQUATION.match(value)
    if equation:
        # "23 + 59 = 82": a worked equation states its result on the right.
        return _canonical_number(equation.group("rhs").rstrip(".,"))
    numbers = _NUMBER.findall(value)
    return _canonical_number(numbers[0]) if len(numbers) == 1 else None


_CHOICE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^\(?([A-Ea-e])\)?[.:]?$"),  # "B", "(b)", "B.", "B:"
    re.compile(r"^\(([A-Ea-e])\)"),  # "(B) Paris"
    re.compile(r"^([A-E])[.):]\s"),  # "B. Paris", "B) Paris"
    re.compile(r"\b(?:option|choice)\s*\(?([A-Ea-e])\)?(?![\w])", re.IGNORECASE),  # "Option b"
)


def _choice(answer: str) -> str | None:
    value = answer.replace("**", "").strip().strip("\"'`")
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(value)
        if match:
            return match.group(1).upper()
    return None


_VERDICT_NAMED = re.compile(r"\b(?:response|assistant|answer|output|model)\s*\(?([AB])\)?(?![\w])", re.IGNORECASE)
_VERDICT_BETTER = re.compile(
    r"\b(?:response|assistant|answer|output|model)\s*\(?([AB])\)?\s+(?:is|was)\s+(?:the\s+)?"
    r"(?:better|superior|preferred|stronger|more\s+helpful)",
    re.IGNORECASE,
)
_TIE = re.compile(r"\b(?:tie|tied|equal|equally|draw|neither)\b", re.IGNORECASE)


def _verdict(answer: str) -> str | None:
    value = answer.replace("**", "").strip()
    bracketed = _MT_BENCH_VERDICT.findall(value)
    if bracketed:
        return {"A": "A", "B": "B", "C": "tie"}[bracketed[-1]]
    bare = value.strip(_SURROUNDING)
    if bare.upper() in ("A", "B"):
        return bare.upper()
    better = {m.upper() for m in _VERDICT_BETTER.findall(value)}
    if len(better) == 1:
        return better.pop()
    if _TIE.search(value):
        return "tie"
    named = {m.upper() for m in _VERDICT_NAMED.findall(value)}
    if len(named) == 1:
        return named.pop()
    return None


_NORMALISERS = {
    "text": _text,
    "yesno": _yesno,
    "number": _number,
    "choice": _choice,
    "verdict": _verdict,
}


def normalise(answer: str, kind: AnswerKind = "text") -> str | None:
    """The canonical form of a direct answer, or None when it is not clearly an answer of ``kind``.

    - ``text``: lowercase, surrounding quotes / backticks / punctuation stripped, whitespace collapsed;
      None if empty or longer than :data:`MAX_TEXT_ANSWER_CHARS`.
    - ``yesno``: "yes" / "no" when unambiguous: the first word is yes/no/true/false, or exactly one of
      "yes" and "no" occurs as a word.
    - ``number``: canonical decimal ("1,000" -> "1000", "3.50" -> "3.5", "85.0" -> "85") when the text
      holds exactly one number, or is a worked equation "a + b = c" (then c).
    - ``choice``: one letter "A"-"E" ("(B)", "B.", "Option b").
    - ``verdict``: "A", "B" or "tie" ("Response A", "[[A]]", "Assistant B is better", "tie", "equal",
      MT-bench's "[[C]]" for a tie).
    """
    if answer is None:
        return None
    try:
        normaliser = _NORMALISERS[kind]
    except KeyError:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(_NORMALISERS)}") from None
    return normaliser(str(answer))


def answers_match(a: str | None, b: str | None, kind: AnswerKind = "text") -> bool:
    """Whether two answers are the same answer: both normalise, and to the same form."""
    if a is None or b is None:
        return False
    na, nb = normalise(a, kind), normalise(b, kind)
    return na is not None and na == nb


def similarity(a: str, b: str) -> float:
    """Token-level F1 between two answers (SQuAD style), for long free-form answers.

    Exact match is too strict for free-form answers (S2A, universal self-consistency): two answers
    that differ in one word are still the same answer. Tokens are words of the lowercased text.
    """
    ta = _WORD.findall((a or "").lower())
    tb = _WORD.findall((b or "").lower())
    if not ta and not tb:
        return 1.0
    if not ta or not tb:
        return 0.0
    counts: dict[str, int] = {}
    for token in ta:
        counts[token] = counts.get(token, 0) + 1
    common = 0
    for token in tb:
        if counts.get(token, 0) > 0:
            counts[token] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(tb), common / len(ta)
    return 2 * precision * recall / (precision + recall)
