"""JSON from outside (HTTP bodies, adapter metadata, file headers), parsed with bounds.

Python's ``json`` recurses once per nesting level (a document nested a few thousand deep
raises ``RecursionError``), refuses integers of more than 4,300 digits with a bare
``ValueError``, and happily returns strings holding lone UTF-16 surrogates (``"\\ud800"``)
that no tokenizer or encoder accepts. ``loads`` bounds size and depth before parsing (a
linear scan, strings skipped by one regex) and turns every failure into ``BadJSON``, so
none of them can surface as a server error.
"""

from __future__ import annotations

import json
import re
from typing import Any

from adapters_zoo.errors import SpecfuseError

MAX_DEPTH = 32  # the deepest request body (chat: body → messages → message → content → part) is 5
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadJSON(SpecfuseError, ValueError):
    """Text that is not JSON, or JSON past a bound (size, depth, digits, lone surrogates)."""


def nesting_depth(data: bytes, stop_at: int = MAX_DEPTH) -> int:
    """The deepest bracket nesting of a JSON text (strings ignored); stops counting past ``stop_at``."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_at:
                    break
        else:
            depth -= 1
    return deepest


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH, max_bytes: int | None = None,
          what: str = "JSON") -> Any:
    """Parse JSON within bounds; every failure is a ``BadJSON`` naming ``what`` and the bound."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise BadJSON(f"{what} is {len(raw)} bytes, at most {max_bytes} are accepted")
    if nesting_depth(raw, max_depth) > max_depth:
        raise BadJSON(f"{what} is nested more than {max_depth} levels deep")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise BadJSON(f"{what} is not valid JSON ({err})") from None
    check_text(value, what)
    return value


def check_text(value: Any, what: str = "JSON") -> None:
    """Refuse strings (values or keys) holding lone surrogates: they are not text and no encoder takes them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise BadJSON(f"{what} holds a string with a lone UTF-16 surrogate (not valid Unicode text)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
