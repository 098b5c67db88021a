"""The checker: walks the raw YAML tree and collects errors with their key paths."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from relayd.config.schema import KEYS, _section_keys, _section_required
from relayd.config.values import _kind, parse_duration, parse_size

_Node = Any  # a raw YAML value: dict, list, str, int, float, bool, None, date, bytes
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_RULE = "use letters, digits, '.', '_' or '-', starting with a letter or digit (max 64)"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(key: str, allowed: frozenset[str] | set[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None


def _did_you_mean(key: str, allowed: frozenset[str] | set[str]) -> str:
    hint = _closest(key, allowed)
    return f" (did you mean {hint!r}?)" if hint else ""


class _Checker:
    """Collects errors with key paths while walking the raw YAML tree."""

    def __init__(self, base_dir: Path):
        self.errors: list[str] = []
        self.base_dir = base_dir

    def err(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def mapping(self, path: str, value: _Node, section: str, dtype: str | None = None,
                extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Check a mapping against the schema section; return its known keys, or None if not a mapping.

        ``None`` (an empty YAML value) counts as an empty mapping. Unknown keys and missing
        required keys are reported; ``extra`` keys are accepted (for tailored messages).
        """
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {_kind(value)}")
            return None
        allowed = _section_keys(section, dtype) | set(extra)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.err(path, f"keys must be strings, got {_kind(key)}")
            elif key in allowed:
                out[key] = item
            elif dtype is not None and key in _section_keys(section):
                only = ", ".join(KEYS[f"{section}.{key}"].types)
                self.err(_join(path, key), f"not used by {dtype} destinations (only by type {only})")
            else:
                self.err(_join(path, key), "unknown key" + _did_you_mean(key, allowed))
        for key in _section_required(section, dtype):
            if out.get(key) is None:
                self.err(_join(path, key), "is required")
        return out

    def string(self, path: str, value: _Node, default: str | None = None) -> Any:
        """A non-empty string without NUL characters, or ``default`` if not set."""
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            self.err(path, f"expected a non-empty string, got {_kind(value)}")
            return default
        if "\0" in value:
            self.err(path, "must not contain NUL characters")
            return default
        return value

    def name(self, path: str, value: _Node) -> str | None:
        """A tenant/user/node/destination name."""
        s = self.string(path, value)
        if s is not None and not _NAME_RE.match(s):
            self.err(path, f"invalid name {s!r}: {_NAME_RULE}")
            return None
        return s

    def integer(self, path: str, value: _Node, default: Any, minimum: int = 0,
                maximum: int | None = None) -> Any:
        """An integer within bounds, or ``default`` if not set or invalid."""
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"expected an integer, got {_kind(value)}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self.err(path, f"must be at least {minimum}" if maximum is None
                     else f"must be between {minimum} and {maximum}")
            return default
        return value

    def boolean(self, path: str, value: _Node, default: Any) -> Any:
        """true/false, or ``default`` if not set."""
        if value is None:
            return default
        if not isinstance(value, bool):
            self.err(path, f"expected true or false, got {_kind(value)}")
            return default
        return value

    def size(self, path: str, value: _Node, default: Any, positive: bool = True) -> Any:
        """A size in bytes (``10GiB``); ``positive`` refuses 0."""
        if value is None:
            return default
        try:
            n = parse_size(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return default
        if positive and n <= 0:
            self.err(path, "must be greater than 0 (leave the key out for no limit)")
            return default
        return n

    def duration(self, path: str, value: _Node, default: Any, positive: bool = False) -> Any:
        """A duration in seconds (``30s``, ``5m``); ``positive`` refuses 0."""
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return default
        if positive and seconds <= 0:
            self.err(path, "must be greater than 0")
            return default
        return seconds

    def str_items(self, path: str, value: _Node) -> list[tuple[str, str]]:
        """The strings of a list (or a single string) with their own key paths."""
        if value is None:
            return []
        if isinstance(value, str):  # a single item may be written without the list
            if not value.strip():
                return self._bad_item(path, value)
            if "\0" in value:
                self.err(path, "must not contain NUL characters")
                return []
            return [(path, value)]
        if not isinstance(value, list):
            self.err(path, f"expected a list of strings, got {_kind(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            ipath = f"{path}[{i}]"
            if not isinstance(item, str) or not item.strip():
                self._bad_item(ipath, item)
            elif "\0" in item:
                self.err(ipath, "must not contain NUL characters")
            else:
                out.append((ipath, item))
        return out

    def _bad_item(self, path: str, item: Any) -> list[tuple[str, str]]:
        self.err(path, f"expected a non-empty string, got {_kind(item)}")
        return []

    def str_list(self, path: str, value: _Node) -> tuple[str, ...]:
        """Like :meth:`str_items`, just the strings."""
        return tuple(s for _, s in self.str_items(path, value))

    def list_of(self, path: str, value: _Node) -> list[tuple[str, Any]]:
        """The items of a list with their key paths (``path[i]``)."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, f"expected a list, got {_kind(value)}")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    def path(self, path: str, value: _Node) -> Path | None:
        """A file system path; relative ones are relative to the config file's folder."""
        s = self.string(path, value)
        if s is None:
            return None
        try:
            p = Path(s).expanduser()
        except RuntimeError as exc:  # ~user that does not exist
            self.err(path, f"cannot expand {s!r}: {exc}")
            return None
        return p if p.is_absolute() else (self.base_dir / p)

    def read_file(self, path: str, p: Path) -> str | None:
        """The text of file ``p``; every failure becomes one error at ``path``."""
        try:
            if p.is_dir():
                self.err(path, f"{p} is a directory, not a file")
                return None
            return p.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.err(path, f"file not found: {p}")
        except OSError as exc:
            self.err(path, f"cannot read {p}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            self.err(path, f"{p} is not UTF-8 text")
        except ValueError as exc:
            self.err(path, f"cannot read {p}: {exc}")
        return None

    def existing_file(self, path: str, p: Path | None) -> None:
        """Report ``p`` if it is not an existing regular file."""
        if p is None:
            return
        try:
            if p.is_dir():
                self.err(path, f"{p} is a directory, not a file")
            elif not p.exists():
                self.err(path, f"file not found: {p}")
        except (OSError, ValueError) as exc:
            self.err(path, f"cannot access {p}: {exc}")
