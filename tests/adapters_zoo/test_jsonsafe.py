"""Bounded JSON: depth, digits and lone surrogates are typed errors, never RecursionError or a bare ValueError."""

from __future__ import annotations

import pytest

from adapters_zoo import jsonsafe


def test_ordinary_json_parses():
    assert jsonsafe.loads(b'{"a": [1, {"b": "]]]{{{\\"x"}], "c": 2.5}') == {"a": [1, {"b": ']]]{{{"x'}], "c": 2.5}
    assert jsonsafe.nesting_depth(b'{"s": "[[[[[[[["}') == 1  # brackets inside strings do not count


@pytest.mark.parametrize("text,needle", [
    ("[" * 5000 + "]" * 5000, "nested more than"),
    ('{"k": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"k": "\\ud800"}', "lone UTF-16 surrogate"),
    ('{"\\udfff": 1}', "lone UTF-16 surrogate"),
    ("{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
], ids=["deep", "digits", "surrogate-value", "surrogate-key", "truncated", "not-utf8"])
def test_bad_json_is_one_typed_error(text, needle):
    with pytest.raises(jsonsafe.BadJSON, match=needle):
        jsonsafe.loads(text)


def test_size_bound():
    with pytest.raises(jsonsafe.BadJSON, match="at most 10 are accepted"):
        jsonsafe.loads('{"a": "0123456789"}', max_bytes=10)
