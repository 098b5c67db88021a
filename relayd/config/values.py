"""Scalar values: sizes, durations and route globs, and the :class:`ConfigError` they lead to."""

from __future__ import annotations

import math
import functools
import re
from functools import lru_cache
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
    "p": 1000**5, "pb": 1000**5, "pib": 1024**5, "pi": 1024**5,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one ``key.path: problem`` line each."""

    exit_code = 2

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def _kind(value: Any) -> str:
    """A short human description of a raw YAML value, for error messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {shown!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def parse_size(value: Any) -> int:
    """Parse ``10GiB``, ``5GB``, ``512k`` or a plain integer into bytes (``ValueError`` if bad).

    Decimal units (k, KB, M, ...) are powers of 1000, binary ones (KiB, Ki, MiB, ...) of 1024.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 10GiB, got {_kind(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _SIZE_UNITS:
                return int(float(m.group(1)) * _SIZE_UNITS[unit])
        if value.strip().startswith("-"):
            raise ValueError("must not be negative")
    raise ValueError(f"expected a size such as 10GiB, got {_kind(value)}")


def parse_duration(value: Any) -> float:
    """Parse ``30s``, ``5m``, ``7d``, ``250ms`` or a plain number of seconds (``ValueError`` if bad)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, got {_kind(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite duration, got {value}")
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
        if value.strip().startswith("-"):
            raise ValueError("must not be negative")
    raise ValueError(f"expected a duration such as 30s, 5m or 7d, got {_kind(value)}")


@lru_cache(maxsize=1024)
@functools.lru_cache(maxsize=1024)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a route ``match`` glob; raise ``ValueError`` naming the problem if it is invalid.

    The pattern is matched against a file's path inside the tenant root (a leading ``/`` on
    either side is ignored). ``*`` and ``?`` never cross a ``/``; a segment that is exactly
    ``**`` matches any number of directories (``**`` alone matches every path); ``[abc]``,
    ``[a-z]`` and ``[!abc]`` are character classes.
    """
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError("empty pattern")
    if "\0" in pattern:
        raise ValueError("contains a NUL character")
    segments = pattern.strip("/").split("/") if pattern != "/" else []
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append(".+" if last else "(?:[^/]+/)*")
            continue
        if not seg:
            raise ValueError("empty path segment ('//')")
        if seg in (".", ".."):
            raise ValueError(f"'{seg}' segments are not allowed")
        if "**" in seg:
            raise ValueError("'**' must be a whole path segment (like a/**/b)")
        out.append(_translate_segment(seg) + ("" if last else "/"))
    return re.compile(r"\A" + "".join(out) + r"\Z", re.DOTALL)


def _translate_segment(seg: str) -> str:
    res: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        i += 1
        if c == "*":
            res.append("[^/]*")
        elif c == "?":
            res.append("[^/]")
        elif c == "[":
            j = i
            if j < n and seg[j] in "!^":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:
                raise ValueError("unclosed '[' character class")
            body = seg[i:j]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            if not body:
                raise ValueError("empty '[]' character class")
            body = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            res.append(("[^/" if negate else "[") + body + "]")
            try:
                re.compile(res[-1])
            except re.error as exc:
                raise ValueError(f"invalid character class [{seg[i:j]}]: {exc}") from None
            i = j + 1
        else:
            res.append(re.escape(c))
    return "".join(res)
