"""`agent bench` option parsing: a bad list is an error that names the option, before anything loads."""

from __future__ import annotations

import pytest

from bench.cli import _fractions, _positive_ints


def test_lists_of_numbers_parse_or_name_the_option() -> None:
    assert _positive_ints("1, 4,8", "--k") == [1, 4, 8]
    assert _fractions("0.1,0.5,1", "--fractions") == [0.1, 0.5, 1.0]
    for parse, text, option in ((_positive_ints, "1,x", "--k"), (_positive_ints, "0,2", "--clients"),
                                (_fractions, "1.5", "--fractions"), (_fractions, "", "--fractions")):
        with pytest.raises(SystemExit, match=f"{option} expects comma-separated"):
            parse(text, option)
