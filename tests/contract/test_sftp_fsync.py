"""The sftp destination asks the server to flush each file to disk before the rename (``fsync``).

The throwaway sshd runs OpenSSH's ``sftp-server -e -l VERBOSE``, which logs every request by name
(``open``, ``fsync``, ``posix-rename``) to a file: the log shows that each temp file was fsynced while open, before
it was renamed into place, on both data paths (asyncssh for small files, the OpenSSH client for
large ones; the flush overlaps the verification), that ``fsync: false`` sends none, and that a server refusing the request
(``sftp-server -P fsync``) still gets the file, with the missing flush noted on the delivery.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from relayd.relay.destinations import Outcome, Payload
from relayd.relay.destinations.base import temp_name
from tests.contract.conftest import DestEnv, Remote, run
from tests.helpers import make_key, sha256_file
from tests.sshd import throwaway_sshd

MIB = 1024 * 1024


SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _remote(tmp_path_factory: pytest.TempPathFactory, name: str, flags: str) -> Iterator[Remote]:
    work = tmp_path_factory.mktemp(name)
    key = make_key(work / "keys", "relay")
    log = work / "sftp-server.log"
    # sshd runs a subsystem command through the user's shell: the redirection keeps the server's
    # log (its stderr) out of the session.
    with throwaway_sshd(work / "sshd", authorized_keys=[key.pub],
                        sftp=f"{SFTP_SERVER} -e -l VERBOSE {flags} 2>>{log}") as srv:
        yield Remote(srv, key)


@pytest.fixture(scope="module")
def logging_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """An sshd whose SFTP server logs each request."""
    yield from _remote(tmp_path_factory, "fsync-log", "")


@pytest.fixture(scope="module")
def refusing_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """An sshd whose SFTP server refuses fsync requests (and logs each request)."""
    yield from _remote(tmp_path_factory, "fsync-deny", "-P fsync")


def _env(remote: Remote, tmp_path: Path) -> DestEnv:
    root = tmp_path / "dest"
    root.mkdir()
    return DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)


def _deliver(env: DestEnv, payloads: list[Payload], **options: object) -> list[Outcome]:
    async def body() -> list[Outcome]:
        dest = env.make(bulk_min_size=MIB, **options)
        try:
            return [await dest.deliver(p) for p in payloads]
        finally:
            await dest.close()
    return run(body())


def _requests(remote: Remote, path: str, deadline: float = 10.0) -> list[str]:
    """The SFTP requests the server logged for ``path`` (``open``, ``fsync``, ``close``, ...),
    once its rename shows up (the log is written by another process)."""
    end = time.monotonic() + deadline
    quoted = re.escape(f'"{path}"')
    pattern = re.compile(rf'^(\w[\w-]*) (?:old |name )?{quoted}', re.MULTILINE)
    while True:
        log = remote.sshd.workdir.parent / "sftp-server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        found = [m.group(1) for m in pattern.finditer(text)]
        if any(r in ("rename", "posix-rename") for r in found) or time.monotonic() > end:
            return found


def test_each_file_is_fsynced_before_the_rename(logging_remote: Remote, tmp_path: Path) -> None:
    env = _env(logging_remote, tmp_path)
    small = env.payload("/in/small.csv", size=20_000, seed=1)
    large = env.payload("/in/large.bin", size=2 * MIB + 7, seed=2)  # OpenSSH client (put -f)
    outcomes = _deliver(env, [small, large])
    for p, out in zip([small, large], outcomes):
        final = env.root / "in" / Path(p.path).name
        assert sha256_file(final) == p.sha256 and out.verified == "sha256" and not out.note
        requests = _requests(logging_remote, temp_name(str(final), p.delivery_id))
        assert requests.count("fsync") == 1, requests
        rename = requests.index("posix-rename")
        # Flushed while open, closed, then renamed (the OpenSSH client's put closes its handle
        # first; the flush then runs on a handle of its own).
        before = requests[:rename]
        assert "fsync" in before and before.count("open") == before.count("close"), requests
    assert not list(env.root.rglob("*.part"))


def test_fsync_false_sends_none(logging_remote: Remote, tmp_path: Path) -> None:
    env = _env(logging_remote, tmp_path)
    small = env.payload("/in/nosync.csv", size=20_000, seed=3)
    large = env.payload("/in/nosync.bin", size=2 * MIB, seed=4)
    _deliver(env, [small, large], fsync=False)
    for p in (small, large):
        final = env.root / "in" / Path(p.path).name
        assert sha256_file(final) == p.sha256
        requests = _requests(logging_remote, temp_name(str(final), p.delivery_id))
        assert "posix-rename" in requests and "fsync" not in requests, requests


def test_server_refusing_fsync_still_gets_the_file_and_it_is_noted(refusing_remote: Remote,
                                                                    tmp_path: Path) -> None:
    env = _env(refusing_remote, tmp_path)
    small = env.payload("/in/a.csv", size=20_000, seed=5)
    large = env.payload("/in/b.bin", size=2 * MIB, seed=6)
    outcomes = _deliver(env, [small, large])
    for p, out in zip([small, large], outcomes):
        assert sha256_file(env.root / "in" / Path(p.path).name) == p.sha256
        assert out.verified == "sha256"
        assert "fsync@openssh.com" in out.note and "not flushed" in out.note, out.note
    assert not list(env.root.rglob("*.part"))
