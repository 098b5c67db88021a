"""Pure path policy for the chrooted SFTP view (no I/O here).

A client path (bytes) is interpreted relative to the tenant root, which the client sees as
``/``. ``.`` is dropped and ``..`` pops a component but never climbs above ``/`` (as OpenSSH
does in a chroot). Names with NUL or control bytes, invalid UTF-8, or over-long components are
refused.
"""

from __future__ import annotations

import errno

__all__ = ["PathRefused", "normalize", "to_virtual", "MAX_NAME", "MAX_PATH"]

MAX_NAME = 255
MAX_PATH = 4096


class PathRefused(OSError):
    """A client path that can never be valid (bad bytes, too long)."""


def normalize(raw: bytes | str) -> tuple[str, ...]:
    """Turn a client path into its components inside the root.

    ``b"/a/./b/../c"`` → ``("a", "c")``; ``b"../../etc"`` → ``("etc",)``; ``b"/"`` → ``()``.
    Raises :class:`PathRefused` (an ``OSError`` with ``EINVAL``/``ENAMETOOLONG``) for bad names.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PATH:
        raise PathRefused(errno.ENAMETOOLONG, "Path too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathRefused(errno.EILSEQ, "Invalid file name (not UTF-8)") from None
    parts: list[str] = []
    for comp in text.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        if any(ord(c) < 32 or ord(c) == 127 for c in comp):
            raise PathRefused(errno.EINVAL, "Invalid file name (control characters)")
        if len(comp.encode("utf-8")) > MAX_NAME:
            raise PathRefused(errno.ENAMETOOLONG, "File name too long")
        parts.append(comp)
    return tuple(parts)


def to_virtual(parts: tuple[str, ...]) -> str:
    """Components → the absolute path the client sees (``("a", "b")`` → ``"/a/b"``)."""
    return "/" + "/".join(parts)
