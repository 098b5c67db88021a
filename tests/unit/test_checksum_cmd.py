"""The exec checksum command parser and coreutils-style output (no server needed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from relayd.gateway.checksum import (ChecksumCommand, CommandRefused, format_line, hash_fd, parse_checksum_command,
                                     pick_algorithm, quote_name)


@pytest.mark.parametrize("command, expected", [
    ("sha256sum /a.bin", ChecksumCommand("sha256sum", "sha256", "/a.bin")),
    ("sha1sum a.bin", ChecksumCommand("sha1sum", "sha1", "a.bin")),
    ("md5sum -- -dash.bin", ChecksumCommand("md5sum", "md5", "-dash.bin")),
    ("sha256sum   '/with space/x;y|z'", ChecksumCommand("sha256sum", "sha256", "/with space/x;y|z")),
    ('sha256sum "/dq $"', None),
    ('sha256sum "/dq \\$x"', None),
    ('sha256sum "/dq \\"q\\" \\\\ \\a"', ChecksumCommand("sha256sum", "sha256", '/dq "q" \\ \\a')),
    ("sha256sum /a\\ b\\;c\\&d\\(e\\)", ChecksumCommand("sha256sum", "sha256", "/a b;c&d(e)")),
    ("sha256sum report#1.csv", ChecksumCommand("sha256sum", "sha256", "report#1.csv")),
    ("sha256sum a~b=c,d@e%f+g]h}", ChecksumCommand("sha256sum", "sha256", "a~b=c,d@e%f+g]h}")),
    ("md5sum /caf\u00e9.txt", ChecksumCommand("md5sum", "md5", "/caf\u00e9.txt")),
    # rclone's unix shell escaping: backslash before every unsafe character, "'\n'" for newlines
    ("md5sum /dir/it\\'s\\ \\(1\\).bin", ChecksumCommand("md5sum", "md5", "/dir/it's (1).bin")),
    ("md5sum /x'\n'y", ChecksumCommand("md5sum", "md5", "/x\ny")),
    ("sha256sum ../../etc/passwd", ChecksumCommand("sha256sum", "sha256", "../../etc/passwd")),
])
def test_accepted(command: str, expected: ChecksumCommand | None) -> None:
    if expected is None:
        with pytest.raises(CommandRefused):
            parse_checksum_command(command)
    else:
        assert parse_checksum_command(command) == expected


@pytest.mark.parametrize("command", [
    "", "sha256sum", "sha256sum --", "sha256sum -", "sha256sum -- -", "sha256sum ''",
    "sha256sum a b", "sha256sum -- a b", "sha256sum -c x", "sha256sum --check x", "sha256sum -b x",
    "sha256sum x -c", "cat x", "/usr/bin/sha256sum x", "sha512sum x", "SHA256SUM x", "md5 -r x",
    "sha256sum x; id", "sha256sum x;id", "sha256sum x && id", "sha256sum x | nc h 1", "sha256sum x > y",
    "sha256sum < x", "sha256sum $(id)", "sha256sum `id`", "sha256sum \"$(id)\"", "sha256sum \"`id`\"",
    "sha256sum $HOME", "sha256sum ${HOME}", "sha256sum *.bin", "sha256sum x?", "sha256sum [ab]",
    "sha256sum {a,b}", "sha256sum ~/x", "sha256sum ~root", "sha256sum x #comment", "sha256sum #x",
    "sha256sum x\nid", "sha256sum x\rid", "sha256sum x\\\nid", "sha256sum 'unterminated",
    'sha256sum "unterminated', "sha256sum x\\", "sha256sum (x)", "sha256sum x&", "sha256sum !x",
    "sha256sum x\x00y", "sha256sum " + "a" * 9000,
])
def test_refused(command: str) -> None:
    with pytest.raises(CommandRefused):
        parse_checksum_command(command)


@pytest.mark.parametrize("name", ["plain.txt", "a\\b", "n\nl", "c\rr", "a\\b\nc"])
def test_format_line_matches_coreutils(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x")
    out = subprocess.run(["sha256sum", "--", name], cwd=tmp_path, capture_output=True, check=True).stdout
    assert format_line(hashlib.sha256(b"x").hexdigest(), name).encode() == out


@pytest.mark.parametrize("name", ["plain", "a:b", "a=b", "~a", "a~", "#a", "a#", "a,b", "a^b", "a{b", "a]b",
                                  "it's", "it's $x", "a b", "a'b\"c", "a\tb", "x\ny", "a`b", "a!b", "caf\u00e9"])
def test_error_quoting_matches_coreutils(tmp_path: Path, name: str) -> None:
    r = subprocess.run(["sha256sum", "--", name], cwd=tmp_path, capture_output=True)
    assert r.returncode == 1
    assert r.stderr.decode() == f"sha256sum: {quote_name(name)}: No such file or directory\n"


def test_pick_algorithm() -> None:
    assert pick_algorithm("sha256") == "sha256"
    assert pick_algorithm("sha512,crc32,md5,sha1") == "md5"
    assert pick_algorithm("SHA1") == "sha1"
    import asyncssh
    with pytest.raises(asyncssh.SFTPOpUnsupported):
        pick_algorithm("sha512,crc32")


@pytest.mark.parametrize("start, length, block", [(0, 0, 0), (5, 0, 0), (5, 1000, 0), (0, 0, 256), (3, 9000, 4096),
                                                  (10 ** 9, 0, 0), (7, 0, 9 << 20), (0, 0, 1 << 20)])
def test_hash_fd_ranges(tmp_path: Path, start: int, length: int, block: int) -> None:
    """Whole ranges, sub-ranges, small blocks (many per piece) and blocks larger than a piece."""
    data = os.urandom(20_000) if block < 1 << 20 else os.urandom(20 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    part = data[start:] if length == 0 else data[start:start + length]
    if block:
        expected = b"".join(hashlib.sha1(part[i:i + block]).digest() for i in range(0, len(part), block))
    else:
        expected = hashlib.sha1(part).digest()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert asyncio.run(hash_fd(fd, "sha1", start, length, block)) == expected
    finally:
        os.close(fd)
