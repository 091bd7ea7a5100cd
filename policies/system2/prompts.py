"""Every prompt text the System 2 methods send, in one place.

Each method has a dict of named templates filled with ``str.format`` (so a literal brace is written
``{{`` / ``}}``). A method's constructor takes ``prompts=`` and merges it over these defaults, so any
template can be overridden from config without touching code::

    ChainOfThought(prompts={"user": "{query}\\nReason it out, then write 'Answer: <answer>'."})

The placeholders each template receives are listed next to it and, as data, in ``PLACEHOLDERS``; a
template may leave any of them out. The ``system`` turn is sent as written, never formatted.
:func:`template_problems` formats every template once with stand-in values, so a configuration with a
misspelt placeholder is refused at start rather than failing at its first System 2 run.
PAL's few-shot programs are data rather than templates: see ``PAL_FAMILIES``.
"""

from __future__ import annotations

from typing import Any, Mapping

ANSWER_LINE = 'End with a last line of the form "Answer: <answer>".'

# --- Chain-of-Thought (cot.py) ---------------------------------------------------------------------
COT: dict[str, str] = {
    # an optional system turn ("": the model's default system prompt)
    "system": "",
    # {query}
    "user": "{query}\n\nLet's think step by step. " + ANSWER_LINE,
}

# --- Direct answer (direct.py) --------------------------------------------------------------------
DIRECT: dict[str, str] = {
    # an optional system turn ("": the model's default system prompt)
    "system": "",
    # {query}: by default the question alone, as System 1 sees it; a strong model answers it as asked
    "user": "{query}",
}

# --- Rephrase-and-Respond (rar.py) -----------------------------------------------------------------
RAR: dict[str, str] = {
    # an optional system turn ("": the model's default system prompt)
    "system": "",
    # 1-step: {query}
    "one_step": "{query}\n\nRephrase and expand the question, and respond. " + ANSWER_LINE,
    # 2-step, first call: {query}
    "rephrase": (
        "{query}\n\nGiven the above question, rephrase and expand it to help you do better answering. "
        "Maintain all information in the original question. Write only the rephrased question."
    ),
    # 2-step, second call: {query}, {rephrased}
    "respond": (
        "(original) {query}\n(rephrased) {rephrased}\n\n"
        "Use your answer to the rephrased question to answer the original question. " + ANSWER_LINE
    ),
}

# --- System 2 Attention (s2a.py) -------------------------------------------------------------------
S2A: dict[str, str] = {
    # an optional system turn ("": the model's default system prompt)
    "system": "",
    # first call, regenerates the input: {query}
    "rewrite": (
        "Given the following text by a user, extract the part that is unbiased and not their opinion, "
        "so that using that text alone would be good context for providing an unbiased answer to the "
        "question portion of the text. Include the actual question the user is asking. Leave out any "
        'opinion or guess such as "I think the answer is X".\n\nText by user:\n{query}\n\n'
        "Write only the extracted text."
    ),
    # second call, answers the rewritten input: {context}
    "respond": "{context}\n\nAnswer the question above. " + ANSWER_LINE,
}

# --- Branch-Solve-Merge (bsm.py) -------------------------------------------------------------------
BSM: dict[str, str] = {
    "system": "You are a careful, impartial judge of answers to questions.",
    # branch: {question}, {num_criteria}
    "branch": (
        "[Question]\n{question}\n\n"
        "We want to judge two answers to the question above. List {num_criteria} short criteria to "
        "judge them by, one per line, each a few words."
    ),
    # solve, once per criterion and order: {question}, {response_a}, {response_b}, {criterion}
    "solve": (
        "[Question]\n{question}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
        "Judge the two responses on this criterion only: {criterion}. Explain in one or two sentences, "
        'then end with a last line "Verdict: A", "Verdict: B" or "Verdict: tie".'
    ),
    # merge, once per sample and order: {question}, {response_a}, {response_b}, {judgements}
    "merge": (
        "[Question]\n{question}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
        "Judgements of the two responses, criterion by criterion:\n{judgements}\n\n"
        "Merge these judgements into one overall decision: which response is better? Explain in one "
        'sentence, then end with a last line "Verdict: A", "Verdict: B" or "Verdict: tie".'
    ),
    # one per-criterion judgement inside {judgements}: {criterion}, {judgement}
    "judgement": "- {criterion}: {judgement}",
}
BSM_DEFAULT_CRITERIA: tuple[str, ...] = ("correctness", "helpfulness", "clarity")
"""Used when the branch output yields no criteria."""

# --- Program-aided (pal.py) ------------------------------------------------------------------------
PAL: dict[str, str] = {
    "system": (
        "You write short Python programs that solve a question. The program stores the final answer "
        "in a variable named answer. Write only the program."
    ),
    # the question turn, for the few-shot examples and for the query: {query}
    "user": "{query}",
    # the program turn of a few-shot example: {program}
    "assistant": "{program}",
}

# --- every method's templates and what each is formatted with --------------------------------------
TEMPLATES: dict[str, dict[str, str]] = {"direct": DIRECT, "cot": COT, "rar": RAR, "s2a": S2A, "bsm": BSM, "pal": PAL}
"""The default templates of each method, by the method's name in ``policies.system2.METHODS``."""

PLACEHOLDERS: dict[str, dict[str, tuple[str, ...]]] = {
    "direct": {"user": ("query",)},
    "cot": {"user": ("query",)},
    "rar": {"one_step": ("query",), "rephrase": ("query",), "respond": ("query", "rephrased")},
    "s2a": {"rewrite": ("query",), "respond": ("context",)},
    "bsm": {
        "branch": ("question", "num_criteria"),
        "solve": ("question", "response_a", "response_b", "criterion"),
        "merge": ("question", "response_a", "response_b", "judgements"),
        "judgement": ("criterion", "judgement"),
    },
    "pal": {"user": ("query",), "assistant": ("program",)},
}
"""The placeholders each template is formatted with; ``system`` is not listed: it is sent as written."""

_STAND_INS: dict[str, Any] = {"num_criteria": 3}
"""Values of the right type for placeholders that are not text (a template may use a format spec)."""

PAL_FAMILIES: dict[str, dict] = {
    # family name -> {"match": regex the query is searched with (None: only by name),
    #                 "answer_kind": how the executed answer is normalised,
    #                 "shots": ((question, program), ...) shown as earlier chat turns}
    "last_letter": {
        "match": r"last letters?\b",
        "answer_kind": "text",
        "shots": (
            (
                "Take the last letters of the words in 'apple house' and concatenate them.",
                'words = "apple house".split()\nanswer = "".join(word[-1] for word in words)',
            ),
            (
                "Take the last letters of the words in 'Bill Gates' and concatenate them.",
                'words = "Bill Gates".split()\nanswer = "".join(word[-1] for word in words)',
            ),
            (
                "Take the last letters of the words in 'river stone cloud' and concatenate them.",
                'words = "river stone cloud".split()\nanswer = "".join(word[-1] for word in words)',
            ),
        ),
    },
    "arithmetic": {
        "match": r"^\s*(what is|compute|calculate)\s+-?\d[\d\s.+\-*/()x×]*\??\s*$",
        "answer_kind": "number",
        "shots": (
            ("What is 47 + 38?", "answer = 47 + 38"),
            ("What is 47 + 38 - 21?", "answer = 47 + 38 - 21"),
            ("What is 12 * 7?", "answer = 12 * 7"),
        ),
    },
    "arithmetic_words": {
        # Two numbers and an operation in words. With the generic shots the model often computed another
        # operation ("Add 47 and 38." -> 47 * 38), so k = 4 programs disagreed and nothing was kept.
        "match": r"^\s*(?:(?:what is|compute|calculate)\s+-?\d+(?:\.\d+)?\s+(?:plus|minus|times|multiplied by|divided by)"
                 r"|(?:what is\s+)?the\s+(?:sum|difference|product)\s+of\s+-?\d+(?:\.\d+)?\s+and"
                 r"|(?:add|subtract|multiply|divide)\s+-?\d+(?:\.\d+)?\s+(?:and|from|by|to))"
                 r"\s+-?\d+(?:\.\d+)?\s*[?.!]?\s*$",
        "answer_kind": "number",
        "shots": (
            ("What is 25 plus 16?", "answer = 25 + 16"),
            ("Add 12 and 30.", "answer = 12 + 30"),
            ("Subtract 9 from 30.", "answer = 30 - 9"),
            ("What is 6 times 7?", "answer = 6 * 7"),
        ),
    },
    "coin_flip": {
        "match": r"\bcoin\b.*\bheads up\b",
        "answer_kind": "yesno",
        # Measured on the embedded model: 0.60 (copying the question as a string and counting, 0.20;
        # one boolean per person, 0.23-0.30: the 135M model drops or mixes up people when it copies).
        "shots": (
            (
                "A coin is heads up. Alice flips the coin. Bob does not flip the coin. "
                "Is the coin still heads up?",
                "flips = 0\nflips += 1  # Alice flips\nflips += 0  # Bob does not flip\n"
                'answer = "yes" if flips % 2 == 0 else "no"',
            ),
            (
                "A coin is heads up. Carol does not flip the coin. Dan flips the coin. Erin flips the "
                "coin. Is the coin still heads up?",
                "flips = 0\nflips += 0  # Carol does not flip\nflips += 1  # Dan flips\n"
                'flips += 1  # Erin flips\nanswer = "yes" if flips % 2 == 0 else "no"',
            ),
        ),
    },
    "generic": {
        "match": None,
        "answer_kind": "text",
        # The length shot, measured on the embedded model (`agent bench system2 --method pal --k 4 --n 100`):
        # letters in a word 0.00 -> 0.87 (accepted 0.01 -> 0.41), sums in words ("Add 47 and 38.") 0.59 ->
        # 0.80. A sorting shot was tried and left out: sorting stayed at 0.03-0.17 with nothing accepted (the
        # model adds key=lambda x: x[0] or copies reverse=True), for ~30 more prompt tokens on every call.
        "shots": (
            ("What is 47 + 38?", "answer = 47 + 38"),
            (
                "Take the last letters of the words in 'apple house' and concatenate them.",
                'words = "apple house".split()\nanswer = "".join(word[-1] for word in words)',
            ),
            (
                "How many days are there in 3 weeks?",
                "days_per_week = 7\nweeks = 3\nanswer = days_per_week * weeks",
            ),
            ("How many characters does the word 'banana' have?", 'answer = len("banana")'),
        ),
    },
}


def merged(defaults: Mapping[str, str], overrides: Mapping[str, str] | None) -> dict[str, str]:
    """``defaults`` with ``overrides`` on top; an unknown template name is an error, not a silent no-op."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise KeyError(f"unknown prompt template(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **overrides}


def template_problems(overrides: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """What is wrong with ``overrides`` (``{method: {template: text}}``) laid over the defaults.

    Every template that would be used, default or overridden, is formatted once with stand-in values of
    its placeholders. Returns ``(name, problem)`` pairs, ``name`` being ``method`` or ``method.template``:
    an unknown method or template name, a text that is not a string, a placeholder the template is not
    given, a stray brace. Empty when every template formats.
    """
    overrides = overrides or {}
    problems: list[tuple[str, str]] = [
        (str(method), f"is not a System 2 method with prompt templates; known: {', '.join(sorted(TEMPLATES))}")
        for method in overrides if method not in TEMPLATES
    ]
    for method, defaults in TEMPLATES.items():
        given = overrides.get(method) or {}
        if not isinstance(given, Mapping):
            problems.append((method, f"must be a table of templates ({', '.join(defaults)}), got {given!r}"))
            continue
        for name, text in {**defaults, **given}.items():
            where = f"{method}.{name}"
            if name not in defaults:
                problems.append((where, f"is not a template of {method}; its templates: {', '.join(defaults)}"))
            elif not isinstance(text, str):
                problems.append((where, f"must be a string, got {text!r}"))
            elif name != "system":
                problems.extend((where, p) for p in _format_problems(text, PLACEHOLDERS[method][name]))
    return problems


def _format_problems(text: str, placeholders: tuple[str, ...]) -> list[str]:
    given = ", ".join("{" + p + "}" for p in placeholders)
    try:
        text.format(**{p: _STAND_INS.get(p, "x") for p in placeholders})
    except KeyError as exc:
        return [f"uses {{{exc.args[0]}}}, which it is not given; it may use {given} (a literal brace is {{{{ or }}}})"]
    except (IndexError, ValueError, AttributeError, TypeError) as exc:
        return [f"is not a valid template ({exc}); it may use {given} (a literal brace is {{{{ or }}}})"]
    return []
