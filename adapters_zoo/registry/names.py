"""Names, versions and tags users give the registry, and ``name@version`` references.

    name, version, tag   [A-Za-z0-9][A-Za-z0-9._-]{0,127}
    ref                  name | name@version

They are catalog keys only: blobs are addressed by sha256, so a name never becomes a
filesystem path. The pattern still rules out separators, a leading dot and empty
strings, so ``../x`` is refused with a message rather than quietly stored.
"""

from __future__ import annotations

import difflib
import re

from adapters_zoo.errors import InvalidName

MAX_NAME_LEN = 128
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN)


def _shown(value: str, limit: int = 48) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _validate(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidName(f"{what} must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidName(f"{what} {_shown(value)} is {len(value)} characters long (at most {MAX_NAME_LEN})")
    if "/" in value or "\\" in value or value in (".", ".."):
        raise InvalidName(f"{what} {_shown(value)} looks like a path: names must not contain '/', '\\' or be '.'/'..'")
    if not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"{what} {_shown(value)} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def validate_name(name: object) -> str:
    """``name`` itself, or InvalidName saying what is wrong with it."""
    return _validate("adapter name", name)


def validate_version(version: object) -> str:
    return _validate("version", version)


def validate_tag(tag: object) -> str:
    return _validate("tag", tag)


def parse_ref(ref: object) -> tuple[str, str | None]:
    """``name`` -> (name, None) (the latest version); ``name@version`` -> (name, version)."""
    if not isinstance(ref, str):
        raise InvalidName(f"adapter reference must be a string, got {type(ref).__name__}")
    name, at, version = ref.partition("@")
    validate_name(name)
    if not at:
        return name, None
    if "@" in version:
        raise InvalidName(f"adapter reference {_shown(ref)} has more than one '@'")
    return name, validate_version(version)


def format_ref(name: str, version: str) -> str:
    return f"{name}@{version}"


def close_matches(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``word`` (typos, case), best first."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[h] for h in hits]
