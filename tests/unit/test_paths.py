"""Pure path policy of the chrooted view."""

from __future__ import annotations

import pytest

from relayd.gateway.paths import MAX_NAME, PathRefused, normalize, to_virtual


@pytest.mark.parametrize("raw, parts", [
    (b"/", ()),
    (b"", ()),
    (b".", ()),
    (b"/a/./b/../c", ("a", "c")),
    (b"../../etc/passwd", ("etc", "passwd")),
    (b"/..", ()),
    (b"a//b/", ("a", "b")),
    (b"/a/b/../../../..", ()),
    ("ünïcode/ファイル".encode(), ("ünïcode", "ファイル")),
    (b"...", ("...",)),
    (b"a/..b", ("a", "..b")),
])
def test_normalize_stays_inside_root(raw: bytes, parts: tuple[str, ...]) -> None:
    assert normalize(raw) == parts
    assert to_virtual(parts).startswith("/")


@pytest.mark.parametrize("raw", [
    b"a\x00b", b"bad\nname", b"\x1b[31m", b"x\x7f", b"\xff\xfe", b"a" * (MAX_NAME + 1), b"a/" * 3000,
])
def test_bad_names_refused(raw: bytes) -> None:
    with pytest.raises(PathRefused):
        normalize(raw)


def test_max_name_allowed() -> None:
    assert normalize(b"a" * MAX_NAME) == ("a" * MAX_NAME,)
