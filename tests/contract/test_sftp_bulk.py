"""The sftp destination's bulk data path: large files written by the OpenSSH ``sftp`` client.

Same throwaway sshd as the contract suite; ``bulk_min_size`` is lowered so small test files take
the OpenSSH path. Covers: the path is taken (and not with ``bulk_client: asyncssh``), resume
with ``reput`` from a partial temp file, a corrupt prefix caught by the final check, names that
need quoting left to asyncssh, and host key pinning inside the OpenSSH client.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from relayd.relay.destinations import DestinationError, Outcome, Payload
from relayd.relay.destinations.base import temp_name
from relayd.relay.destinations.openssh import OpenSSHBulk, find_sftp_client
from relayd.relay.destinations.sftp import SftpDestination
from tests.contract.conftest import DestEnv, Remote, impostor_known_hosts, run
from tests.helpers import sha256_file

MIB = 1024 * 1024


@pytest.fixture
def env(remote: Remote, tmp_path: Path) -> DestEnv:
    root = tmp_path / "dest"
    root.mkdir()
    return DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)


def _deliver(env: DestEnv, payload: Payload, **options: object) -> tuple[Outcome, int]:
    """Deliver once with bulk_min_size 1 MiB; (outcome, uploads made by the OpenSSH client)."""
    async def body() -> tuple[Outcome, int]:
        dest = env.make(bulk_min_size=MIB, **options)
        assert isinstance(dest, SftpDestination)
        try:
            out = await dest.deliver(payload)
            return out, dest.bulk.uploads if dest.bulk is not None else 0
        finally:
            await dest.close()
    return run(body())


def test_openssh_client_is_installed() -> None:
    assert find_sftp_client() is not None  # scripts/test installs openssh-client


def test_large_file_goes_through_openssh(env: DestEnv) -> None:
    p = env.payload("/big/b.bin", size=3 * MIB + 5, seed=1)
    os.chmod(p.source, 0o444)  # spool objects are read-only; the delivered file must not be
    out, uploads = _deliver(env, p)
    assert uploads == 1 and out.bytes_sent == p.size and out.verified == "sha256"
    assert sha256_file(env.root / "big" / "b.bin") == p.sha256
    assert (env.root / "big" / "b.bin").stat().st_mode & 0o777 == 0o644
    assert not list(env.root.rglob("*.part"))
    # Below the threshold, and with bulk_client: asyncssh, asyncssh writes it.
    small = env.payload("/big/s.bin", size=MIB - 1, seed=2)
    assert _deliver(env, small)[1] == 0
    q = env.payload("/big/c.bin", size=3 * MIB, seed=3)
    out, uploads = _deliver(env, q, bulk_client="asyncssh")
    assert uploads == 0 and sha256_file(env.root / "big" / "c.bin") == q.sha256


def test_resume_appends_with_reput(env: DestEnv) -> None:
    p = env.payload("/r.bin", size=4 * MIB, seed=4)
    partial = MIB + 12345
    temp = Path(temp_name(str(env.root / "r.bin"), p.delivery_id))
    temp.write_bytes(p.source.read_bytes()[:partial])
    os.chmod(temp, 0o444)  # as an interrupted put of a read-only spool object would leave it
    out, uploads = _deliver(env, p)
    assert uploads == 1
    assert (out.resumed_from, out.bytes_sent) == (partial, p.size - partial)
    assert sha256_file(env.root / "r.bin") == p.sha256 and not temp.exists()
    assert (env.root / "r.bin").stat().st_mode & 0o777 == 0o644


def test_corrupt_prefix_is_caught_then_sent_whole(env: DestEnv) -> None:
    p = env.payload("/c.bin", size=3 * MIB, seed=5)
    temp = Path(temp_name(str(env.root / "c.bin"), p.delivery_id))
    temp.write_bytes(b"\xff" * 10 + p.source.read_bytes()[10:MIB])
    with pytest.raises(DestinationError) as info:
        _deliver(env, p)
    assert info.value.retryable and "sha256 mismatch" in str(info.value)
    assert not temp.exists() and not (env.root / "c.bin").exists()
    out, _ = _deliver(env, p)
    assert (out.resumed_from, out.bytes_sent) == (0, p.size)
    assert sha256_file(env.root / "c.bin") == p.sha256


def test_names_needing_quotes_use_asyncssh(env: DestEnv) -> None:
    p = env.payload('/odd "name" [1]*.bin', size=2 * MIB, seed=6)
    out, uploads = _deliver(env, p)
    assert uploads == 0
    assert sha256_file(env.root / 'odd "name" [1]*.bin') == p.sha256


def test_openssh_client_refuses_an_unpinned_host_key(env: DestEnv, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert env.remote is not None
    srv = env.remote.sshd
    wrong = impostor_known_hosts(env.remote, tmp_path)
    program = find_sftp_client()
    assert program is not None
    bulk = OpenSSHBulk(program=program, host=srv.host, port=srv.port, user=srv.user, identity=env.remote.key.path,
                       known_hosts=wrong, connect_timeout=10, block_size=32768, requests=8, name="t")
    p = env.payload("/k.bin", size=1000, seed=7)
    caplog.set_level(logging.INFO, logger="relayd.relay.destinations")
    with pytest.raises(DestinationError) as info:
        run(bulk.upload(p.source, str(env.root / "k.bin"), 0, p.size))
    assert info.value.retryable and "host key mismatch" in str(info.value)
    assert any("ALERT" in r.getMessage() for r in caplog.records)
    assert not (env.root / "k.bin").exists()


def test_openssh_clients_are_bounded_by_concurrency(env: DestEnv) -> None:
    """A backlog of large files: at most ``concurrency`` OpenSSH clients (connections) at once,
    however many deliveries share the pooled connections; all arrive intact."""
    payloads = [env.payload(f"/many/m{i}.bin", size=2 * MIB + i, seed=20 + i) for i in range(6)]

    async def body() -> tuple[int, int]:
        dest = env.make(bulk_min_size=MIB, concurrency=2, streams=8)
        assert isinstance(dest, SftpDestination) and dest.bulk is not None and dest.slots == 16
        try:
            outs = await asyncio.gather(*(dest.deliver(p) for p in payloads))
            assert all(o.verified == "sha256" for o in outs)
            return dest.bulk.uploads, dest.bulk.peak
        finally:
            await dest.close()

    uploads, peak = run(body())
    assert uploads == len(payloads) and 1 <= peak <= 2
    for p in payloads:
        assert sha256_file(env.root / p.path.lstrip("/")) == p.sha256
    assert not list(env.root.rglob("*.part"))
