"""System 2 methods: each turns a query into ``k`` sampled answers and a consistency decision.

Pick one by name with :func:`make_method`; add one with a new module and an entry in ``METHODS``.
"""

from __future__ import annotations

from policies.consistency import Decision
from policies.lm import LM, Call, Generation
from policies.system2.auto import Auto
from policies.system2.base import Sample, System2Method, System2Result
from policies.system2.bsm import BranchSolveMerge, format_judge_query, parse_judge_query
from policies.system2.cot import ChainOfThought
from policies.system2.direct import Direct
from policies.system2.pal import ProgramAided
from policies.system2.rar import RephraseAndRespond
from policies.system2.s2a import System2Attention

METHODS: dict[str, type[System2Method]] = {
    "cot": ChainOfThought,
    "rar": RephraseAndRespond,
    "s2a": System2Attention,
    "bsm": BranchSolveMerge,
    "pal": ProgramAided,
    "direct": Direct,
    "auto": Auto,
}
"""Methods by name. ``auto`` is built from two others (``Auto(first, fallback)``): the runtime builds it
from ``pal`` and ``system2.fallback``."""


class UnknownMethodError(ValueError):
    """No System 2 method has that name."""


def make_method(name: str, **kwargs) -> System2Method:
    """An instance of the method called ``name``, built with ``kwargs`` (its constructor's parameters)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown System 2 method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    return cls(**kwargs)


__all__ = [
    "LM",
    "Auto",
    "METHODS",
    "BranchSolveMerge",
    "Call",
    "ChainOfThought",
    "Decision",
    "Direct",
    "Generation",
    "ProgramAided",
    "RephraseAndRespond",
    "Sample",
    "System2Attention",
    "System2Method",
    "System2Result",
    "UnknownMethodError",
    "format_judge_query",
    "make_method",
    "parse_judge_query",
]
