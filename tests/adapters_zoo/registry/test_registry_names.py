"""Names, references and mixture strings: the edge cases, no registry needed."""

from __future__ import annotations

import math

import pytest

from adapters_zoo.errors import InvalidMixture, InvalidName, RegistryError
from adapters_zoo.registry import (
    MAX_MIXTURE,
    mixture_pairs,
    parse_mixture,
    parse_ref,
    validate_name,
    validate_tag,
    validate_version,
)


@pytest.mark.parametrize("good", ["a", "A9", "math", "math-v2.1_x", "0", "a" * 128, "a..b"])
def test_good_names(good):
    assert validate_name(good) == good == validate_version(good) == validate_tag(good)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "empty"),
        ("a" * 129, "129 characters"),
        ("../x", "path"),
        ("a/b", "path"),
        ("a\\b", "path"),
        ("..", "path"),
        (".", "path"),
        (".hidden", "not allowed"),
        ("-x", "not allowed"),
        ("_x", "not allowed"),
        ("a b", "not allowed"),
        ("a:b", "not allowed"),
        ("a@b", "not allowed"),
        ("naïve", "not allowed"),
        ("x\n", "not allowed"),
        ("x\x00", "not allowed"),
    ],
)
def test_bad_names_say_why(bad, why):
    with pytest.raises(InvalidName, match=why) as err:
        validate_name(bad)
    assert isinstance(err.value, ValueError) and isinstance(err.value, RegistryError)
    assert "\n" not in str(err.value)


def test_non_strings_are_refused():
    with pytest.raises(InvalidName, match="string"):
        validate_name(3)
    with pytest.raises(InvalidName, match="string"):
        parse_ref(None)


def test_refs():
    assert parse_ref("math") == ("math", None)
    assert parse_ref("math@2") == ("math", "2")
    assert parse_ref("math@v1.0-rc") == ("math", "v1.0-rc")
    for bad in ("math@", "@2", "a@b@c", "../a@1", "a@../1"):
        with pytest.raises(InvalidName):
            parse_ref(bad)


# --------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("math", [("math", 1.0)]),
        ("math@2", [("math@2", 1.0)]),
        ("math:0.7,code:0.3", [("math", 0.7), ("code", 0.3)]),
        (" math@2 : 0.5 ,  code ", [("math@2", 0.5), ("code", 1.0)]),
        ("a:1e-3,b:+.5,c:2.", [("a", 0.001), ("b", 0.5), ("c", 2.0)]),
        ("a:0,b:1", [("a", 0.0), ("b", 1.0)]),
        ("a@1.0:0.25", [("a@1.0", 0.25)]),
    ],
)
def test_parse_mixture(text, expected):
    assert parse_mixture(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a,,b", "entry 2 of mixture .* is empty"),
        ("a,", "entry 2 .* is empty"),
        (",a", "entry 1 .* is empty"),
        (":0.5", "must not be empty"),
        ("a:", "not a finite decimal"),
        ("a:nan", "not a finite decimal"),
        ("a:NaN", "not a finite decimal"),
        ("a:inf", "not a finite decimal"),
        ("a:-inf", "not a finite decimal"),
        ("a:1e400", "finite"),
        ("a:0x10", "not a finite decimal"),
        ("a:1_0", "not a finite decimal"),
        ("a:one", "not a finite decimal"),
        ("a:-0.5", "negative"),
        ("a:0,b:0", "every weight"),
        ("a:0", "every weight"),
        ("a,a", "appears twice"),
        ("a@1:0.5,a@1:0.2", "appears twice"),
        ("a:1:2", "more than one ':'"),
        ("../etc:1", "path"),
        ("a b:1", "not allowed"),
        ("a@:1", "version must not be empty"),
    ],
)
def test_bad_mixtures_say_why(text, why):
    with pytest.raises(InvalidMixture, match=why) as err:
        parse_mixture(text)
    assert "\n" not in str(err.value)


def test_negative_weights_only_when_allowed():
    assert parse_mixture("a:1,b:-0.5", allow_negative=True) == [("a", 1.0), ("b", -0.5)]
    with pytest.raises(InvalidMixture, match="every weight"):
        parse_mixture("a:-0", allow_negative=True)
    with pytest.raises(InvalidMixture, match="finite"):
        parse_mixture("a:-1e999", allow_negative=True)


def test_mixture_length_is_bounded():
    at_limit = ",".join(f"a{i}:0.5" for i in range(MAX_MIXTURE))
    assert len(parse_mixture(at_limit)) == MAX_MIXTURE == 64
    with pytest.raises(InvalidMixture, match="at most 64"):
        parse_mixture(at_limit + ",extra")
    with pytest.raises(InvalidMixture, match="at most 2"):
        parse_mixture("a,b,c", max_entries=2)
    with pytest.raises(InvalidMixture, match="too long"):
        parse_mixture("a" * 10**6)
    with pytest.raises(InvalidMixture, match="must be a string"):
        parse_mixture(None)


def test_mixture_maps_are_checked_like_strings():
    assert mixture_pairs({"math": 0.7, "code@2": 1}) == [("math", 0.7), ("code@2", 1.0)]
    assert mixture_pairs("math:0.5") == [("math", 0.5)]
    for bad, why in [
        ({}, "empty"),
        ({"a": math.nan}, "finite"),
        ({"a": math.inf}, "finite"),
        ({"a": True}, "must be a number"),
        ({"a": "0.5"}, "must be a number"),
        ({"a": -1}, "negative"),
        ({"a": 0}, "every weight"),
        ({1: 0.5}, "must be strings"),
        ({"../a": 0.5}, "path"),
        ({f"a{i}": 1.0 for i in range(65)}, "at most 64"),
        ([("a", 1.0)], "string or a"),
    ]:
        with pytest.raises(InvalidMixture, match=why):
            mixture_pairs(bad)
