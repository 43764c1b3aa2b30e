"""The string operations behind every task, and the input domains they are asked on.

An :class:`Op` is a pure function ``str -> str`` with the short key the demo base model
is pretrained under (``rev:abc=cba``). A :class:`Domain` draws one input string from a
``random.Random``. Suites (``suites.py``) pair an op with a domain and give the pair a
*new* prefix; pretraining (``adapters_zoo.demo_model``) uses the op's own key. Nothing
here knows about prompts, splits or tokenizers.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LOWER = string.ascii_lowercase
UPPER = string.ascii_uppercase
DIGITS = string.digits
# A fixed letter substitution (keyboard order): readable in the source, no seed to keep in sync.
CIPHER = "qwertyuiopasdfghjklzxcvbnm"
_CIPHER_TABLE = str.maketrans(LOWER, CIPHER)
_SHIFT_TABLE = str.maketrans(LOWER + UPPER, LOWER[1:] + LOWER[0] + UPPER[1:] + UPPER[0])
_CLOSER = {"(": ")", "[": "]", "{": "}", "<": ">"}


@dataclass(frozen=True)
class Op:
    """A string operation and the key the base model learns it under."""

    key: str  # pretraining prefix; no suite prefix may start with it
    fn: Callable[[str], str]


@dataclass(frozen=True)
class Domain:
    """A kind of input: ``sample(rng)`` returns one input string."""

    name: str
    sample: Callable[[random.Random], str]


# --- operations ---------------------------------------------------------------------


def reverse(s: str) -> str:
    return s[::-1]


def shift(s: str) -> str:
    """Each letter to the next one, wrapping z → a."""
    return s.translate(_SHIFT_TABLE)


def upper(s: str) -> str:
    return s.upper()


def cipher(s: str) -> str:
    return s.translate(_CIPHER_TABLE)


def double(s: str) -> str:
    return "".join(c + c for c in s)


def sort_chars(s: str) -> str:
    return "".join(sorted(s))


def rotate(s: str) -> str:
    """First character moved to the end."""
    return s[1:] + s[:1]


def swap_pairs(s: str) -> str:
    """Swap neighbours: ``abcde`` → ``badce``."""
    return "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2))


def count_stars(s: str) -> str:
    return str(s.count("*"))


def reformat_date(s: str) -> str:
    """``YYYY-MM-DD`` → ``DD/MM/YYYY``."""
    year, month, day = s.split("-")
    return f"{day}/{month}/{year}"


def host_of(s: str) -> str:
    """The part of an address after ``@``: ``ann@mail.org`` → ``mail.org``."""
    return s.split("@", 1)[1]


def close_brackets(s: str) -> str:
    """The closers that balance a run of openers: ``([<`` → ``>])``."""
    return "".join(_CLOSER[c] for c in reversed(s))


def match_brackets(s: str) -> str:
    """Each opener's closer, in the same order: ``([<`` → ``)]>``."""
    return "".join(_CLOSER[c] for c in s)


def user_of(s: str) -> str:
    """The part of an address before ``@``: ``ann@mail.org`` → ``ann``."""
    return s.split("@", 1)[0]


def keep_digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


OPS: dict[str, Op] = {
    op.key: op
    for op in (
        Op("rev", reverse),
        Op("sft", shift),
        Op("upp", upper),
        Op("cph", cipher),
        Op("dbl", double),
        Op("srt", sort_chars),
        Op("rot", rotate),
        Op("swp", swap_pairs),
        Op("cnt", count_stars),
        Op("dat", reformat_date),
        Op("hst", host_of),
        Op("cls", close_brackets),
        Op("flt", keep_digits),
        Op("mch", match_brackets),  # pretraining only: siblings of cls and hst, see suites.py
        Op("usr", user_of),
    )
}


# --- input domains ------------------------------------------------------------------


def _chars(alphabet: str, lo: int, hi: int) -> Callable[[random.Random], str]:
    def sample(rng: random.Random) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    return sample


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _email(rng: random.Random) -> str:
    def word() -> str:
        return "".join(rng.choice(LOWER) for _ in range(rng.randint(2, 5)))

    return f"{word()}@{word()}.{rng.choice(('com', 'org', 'net'))}"


def _mixed(rng: random.Random) -> str:
    """Letters and digits, at least one of each (so it never looks like another domain)."""
    n = rng.randint(4, 8)
    chars = [rng.choice(LOWER), rng.choice(DIGITS)]
    chars += [rng.choice(LOWER + DIGITS) for _ in range(n - 2)]
    rng.shuffle(chars)
    return "".join(chars)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("lower", _chars(LOWER, 3, 6)),
        Domain("upper", _chars(UPPER, 3, 6)),
        Domain("digits", _chars(DIGITS, 3, 6)),
        Domain("stars", _chars("*-", 4, 12)),
        Domain("date", _date),
        Domain("email", _email),
        Domain("openers", _chars("([{<", 2, 6)),
        Domain("mixed", _mixed),
    )
}
