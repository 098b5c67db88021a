"""One contract suite for every destination kind: local, and sftp against a throwaway OpenSSH sshd.

Real files and a real server; every wait has a deadline. sftp-only tests at the end cover host key
pinning, a server that is down, authentication, connection reuse and the exec-less fallback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from relayd.relay.destinations import DestinationError, Outcome, Payload, create_destination, registered_kinds
from relayd.relay.destinations.base import conflict_name, temp_name
from relayd.relay.destinations.sftp import SftpDestination
from tests.contract.conftest import DestEnv, Remote, impostor_known_hosts, run
from tests.helpers import free_port, make_file, make_key, sha256_file


def parts(root: Path) -> list[Path]:
    """Temp files left anywhere under ``root``."""
    return sorted(root.rglob("*.part"))


def files(directory: Path) -> list[str]:
    """Names of the files in ``directory`` (not recursive), sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def write_temp(final: Path, payload: Payload, data: bytes) -> Path:
    """Pre-make the temp file an earlier attempt would have left."""
    temp = Path(temp_name(str(final), payload.delivery_id))
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(data)
    return temp


def deliver(env: DestEnv, payload: Payload, **options: object) -> Outcome:
    """Build a destination, deliver once, close it."""
    async def body() -> Outcome:
        dest = env.make(**options)
        try:
            return await dest.deliver(payload)
        finally:
            await dest.close()
    return run(body())


def deliver_error(env: DestEnv, payload: Payload, **options: object) -> DestinationError:
    """Deliver once, expecting a DestinationError; return it."""
    with pytest.raises(DestinationError) as info:
        deliver(env, payload, **options)
    return info.value


# --- the contract, for every kind ----------------------------------------------------------------

def test_kinds_are_registered() -> None:
    assert {"local", "sftp"} <= set(registered_kinds())


def test_delivers_right_content_and_leaves_no_part(env: DestEnv) -> None:
    p = env.payload("/data.csv", size=300_001, seed=1)
    out = deliver(env, p)
    final = env.root / "data.csv"
    assert out == Outcome(remote_path=str(final), verified="sha256", remote_digest=p.sha256,
                          bytes_sent=p.size, resumed_from=0, note="")
    assert sha256_file(final) == p.sha256
    assert parts(env.root) == []


def test_placeholders_use_utc_date(env: DestEnv) -> None:
    # 23:59 at UTC-02:00 is already the next day in UTC.
    p = env.payload("/x.bin", size=10, tenant="globex", user="globex-1",
                    received_at="2026-12-03T23:59:59.500000-02:00")
    out = deliver(env, p, path=f"{env.root}/{{tenant}}/by-user/{{user}}/{{date}}")
    final = env.root / "globex" / "by-user" / "globex-1" / "2026-12-04" / "x.bin"
    assert out.remote_path == str(final)
    assert sha256_file(final) == p.sha256


def test_creates_subdirectories(env: DestEnv) -> None:
    p = env.payload("/a/b/c/deep.bin", size=4096, seed=2)
    out = deliver(env, p, path=f"{env.root}/{{tenant}}")
    final = env.root / "acme" / "a" / "b" / "c" / "deep.bin"
    assert out.remote_path == str(final) and sha256_file(final) == p.sha256
    assert parts(env.root) == []


@pytest.mark.parametrize("on_conflict", ["overwrite", "rename", "fail"])
def test_redelivery_is_idempotent(env: DestEnv, on_conflict: str) -> None:
    p = env.payload("/in/once.csv", size=70_000, seed=3)

    async def body() -> tuple[Outcome, Outcome]:
        dest = env.make(on_conflict=on_conflict)
        try:
            return await dest.deliver(p), await dest.deliver(p)
        finally:
            await dest.close()

    first, second = run(body())
    assert first.bytes_sent == p.size
    assert second.bytes_sent == 0 and second.resumed_from == p.size
    assert second.remote_path == first.remote_path == str(env.root / "in" / "once.csv")
    assert second.verified == "sha256" and second.remote_digest == p.sha256
    assert files(env.root / "in") == ["once.csv"]


def test_resumes_from_partial_temp(env: DestEnv) -> None:
    p = env.payload("/r.bin", size=1_000_000, seed=4)
    partial = 377_777
    temp = write_temp(env.root / "r.bin", p, p.source.read_bytes()[:partial])
    out = deliver(env, p)
    assert (out.resumed_from, out.bytes_sent) == (partial, p.size - partial)
    assert out.verified == "sha256"
    assert sha256_file(env.root / "r.bin") == p.sha256
    assert not temp.exists() and parts(env.root) == []


def test_corrupt_prefix_is_caught_then_restarted(env: DestEnv) -> None:
    p = env.payload("/c.bin", size=500_000, seed=5)
    good = p.source.read_bytes()[:200_000]
    temp = write_temp(env.root / "c.bin", p, bytes(b ^ 0xFF for b in good[:10]) + good[10:])
    err = deliver_error(env, p)
    assert err.retryable
    assert not temp.exists() and not (env.root / "c.bin").exists()
    out = deliver(env, p)
    assert (out.resumed_from, out.bytes_sent) == (0, p.size)
    assert sha256_file(env.root / "c.bin") == p.sha256


def test_oversized_temp_starts_over(env: DestEnv) -> None:
    p = env.payload("/o.bin", size=1000, seed=6)
    write_temp(env.root / "o.bin", p, b"x" * 5000)
    out = deliver(env, p)
    assert (out.resumed_from, out.bytes_sent) == (0, 1000)
    assert sha256_file(env.root / "o.bin") == p.sha256 and parts(env.root) == []


def test_on_conflict_overwrite_is_default(env: DestEnv) -> None:
    (env.root / "f.txt").write_bytes(b"older file")
    p = env.payload("/f.txt", size=2000, seed=7)
    out = deliver(env, p)
    assert out.remote_path == str(env.root / "f.txt")
    assert sha256_file(env.root / "f.txt") == p.sha256
    assert files(env.root) == ["f.txt"]


def test_on_conflict_rename_keeps_both(env: DestEnv) -> None:
    (env.root / "f.txt").write_bytes(b"older file")
    p = env.payload("/f.txt", size=2000, seed=8)
    out = deliver(env, p, on_conflict="rename")
    assert out.remote_path == str(env.root / f"f.{p.delivery_id}.txt")
    assert out.remote_path == conflict_name(str(env.root / "f.txt"), p.delivery_id)
    assert (env.root / "f.txt").read_bytes() == b"older file"
    assert sha256_file(Path(out.remote_path)) == p.sha256
    assert files(env.root) == sorted(["f.txt", f"f.{p.delivery_id}.txt"])
    # A re-delivery finds the kept copy again: still two files.
    again = deliver(env, p, on_conflict="rename")
    assert again.bytes_sent == 0 and again.remote_path == out.remote_path
    assert len(files(env.root)) == 2


def test_on_conflict_fail_is_not_retryable(env: DestEnv) -> None:
    (env.root / "f.txt").write_bytes(b"older file")
    p = env.payload("/f.txt", size=2000, seed=9)
    err = deliver_error(env, p, on_conflict="fail")
    assert not err.retryable and "already exists" in str(err)
    assert (env.root / "f.txt").read_bytes() == b"older file"
    assert parts(env.root) == []


def test_on_conflict_fail_publishes_when_free(env: DestEnv) -> None:
    p = env.payload("/new.txt", size=2000, seed=10)
    out = deliver(env, p, on_conflict="fail")
    assert out.remote_path == str(env.root / "new.txt") and sha256_file(env.root / "new.txt") == p.sha256
    assert parts(env.root) == []


def test_verify_size(env: DestEnv) -> None:
    p = env.payload("/s.bin", size=12345, seed=11)
    out = deliver(env, p, verify=False)
    assert (out.verified, out.remote_digest) == ("size", None)
    assert sha256_file(env.root / "s.bin") == p.sha256


def test_unsafe_payload_path_is_refused(env: DestEnv) -> None:
    p = env.payload("/../escape.bin", size=10)
    err = deliver_error(env, p)
    assert not err.retryable
    assert not (env.tmp / "escape.bin").exists()
    q = env.payload("/ok.bin", size=10, delivery_id="../../x")
    assert not deliver_error(env, q).retryable
    assert files(env.root) == [] and parts(env.tmp) == []


def test_missing_spool_object_is_not_retryable(env: DestEnv) -> None:
    p = env.payload("/gone.bin", size=10)
    p.source.unlink()
    assert not deliver_error(env, p).retryable


def test_large_file_50_mib(env: DestEnv) -> None:
    p = env.payload("/big/fifty.bin", size=50 * 1024 * 1024 + 17, seed=12)
    out = deliver(env, p)
    assert out.bytes_sent == p.size and out.verified == "sha256"
    assert sha256_file(env.root / "big" / "fifty.bin") == p.sha256
    assert parts(env.root) == []


def test_bad_options_are_refused_at_construction(env: DestEnv) -> None:
    with pytest.raises(ValueError, match="on_conflict"):
        create_destination(env.config(on_conflict="merge"))
    with pytest.raises(ValueError, match="placeholder"):
        create_destination(env.config(path=f"{env.root}/{{host}}"))


# --- sftp only ---------------------------------------------------------------------------------

@pytest.fixture
def sftp_env(remote: Remote, tmp_path: Path) -> DestEnv:
    root = tmp_path / "dest"
    root.mkdir()
    return DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)


def test_sftp_host_key_mismatch_is_refused_with_alert(sftp_env: DestEnv, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert sftp_env.remote is not None
    srv = sftp_env.remote.sshd
    wrong = impostor_known_hosts(sftp_env.remote, tmp_path)
    unknown = tmp_path / "known_hosts.empty"
    unknown.write_text("")
    caplog.set_level(logging.INFO, logger="relayd.relay.destinations")
    for known_hosts in (wrong, unknown):
        caplog.clear()
        p = sftp_env.payload("/k.bin", size=10)
        err = deliver_error(sftp_env, p, known_hosts=known_hosts)
        assert err.retryable
        assert f"host key mismatch for {srv.host}:{srv.port}" in str(err)
        alerts = [r for r in caplog.records if r.levelno == logging.ERROR and "ALERT" in r.getMessage()]
        assert alerts, caplog.text
    assert files(sftp_env.root) == []


def test_sftp_destination_down_is_retryable(sftp_env: DestEnv) -> None:
    p = sftp_env.payload("/d.bin", size=10)
    err = deliver_error(sftp_env, p, port=free_port())
    assert err.retryable and "cannot connect" in str(err)


def test_sftp_auth_failure_is_retryable_and_logged(sftp_env: DestEnv, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    stranger = make_key(tmp_path / "stranger", "stranger")
    caplog.set_level(logging.INFO, logger="relayd.relay.destinations")
    err = deliver_error(sftp_env, sftp_env.payload("/a.bin", size=10), identity=stranger.path)
    assert err.retryable and "authentication failed" in str(err)
    assert any(r.levelno == logging.ERROR and "authentication failed" in r.getMessage() for r in caplog.records)
    err = deliver_error(sftp_env, sftp_env.payload("/a.bin", size=10), identity=tmp_path / "no-such-key")
    assert err.retryable and "cannot use identity" in str(err)
    assert files(sftp_env.root) == []


def test_sftp_connection_is_reused_then_closed_when_idle(sftp_env: DestEnv) -> None:
    assert sftp_env.remote is not None
    srv = sftp_env.remote.sshd
    logins_before = srv.log().count("Accepted publickey")
    p1, p2 = sftp_env.payload("/one.bin", size=5000, seed=1), sftp_env.payload("/two.bin", size=6000, seed=2)

    async def body() -> None:
        dest = sftp_env.make(idle_timeout=0.3)
        assert isinstance(dest, SftpDestination)
        try:
            await dest.deliver(p1)
            await dest.deliver(p2)
            assert dest.pool.opened == 1
            assert srv.log().count("Accepted publickey") == logins_before + 1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while dest.pool.size:  # the idle timer closes it
                assert loop.time() < deadline, "idle connection was not closed"
                await asyncio.sleep(0.02)
            await dest.deliver(sftp_env.payload("/three.bin", size=10))
            assert dest.pool.opened == 2
        finally:
            await dest.close()

    run(body())
    assert files(sftp_env.root) == ["one.bin", "three.bin", "two.bin"]


def test_sftp_concurrent_deliveries_stay_within_pool_limit(sftp_env: DestEnv) -> None:
    payloads = [sftp_env.payload(f"/many/{i}.bin", size=20_000 + i, seed=i) for i in range(8)]

    async def body() -> int:
        dest = sftp_env.make(concurrency=2)
        assert isinstance(dest, SftpDestination)
        try:
            outs = await asyncio.gather(*(dest.deliver(p) for p in payloads))
            assert all(o.verified == "sha256" for o in outs)
            return dest.pool.opened
        finally:
            await dest.close()

    assert run(body()) <= 2
    for p in payloads:
        assert sha256_file(sftp_env.root / p.path.lstrip("/")) == p.sha256


def test_sftp_without_exec_falls_back_to_size(sftp_only_remote: Remote, tmp_path: Path) -> None:
    root = tmp_path / "dest"
    root.mkdir()
    env = DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=sftp_only_remote)
    p = env.payload("/nx.bin", size=1_300_000, seed=13)
    out = deliver(env, p)
    assert (out.verified, out.remote_digest) == ("size", None)
    assert "sha256 unavailable" in out.note and "verified size only" in out.note
    assert sha256_file(root / "nx.bin") == p.sha256
    # Without a remote digest a re-delivery cannot prove the final file is ours: it sends again
    # (overwrite), but still leaves exactly one copy.
    again = deliver(env, p)
    assert again.bytes_sent == p.size
    assert files(root) == ["nx.bin"] and parts(root) == []
    # Keep-both: the name carrying the delivery id is trusted on size, so nothing is re-sent.
    (root / "kb.bin").write_bytes(b"theirs")
    q = env.payload("/kb.bin", size=1_100_000, seed=14)
    first = deliver(env, q, on_conflict="rename")
    second = deliver(env, q, on_conflict="rename")
    assert first.remote_path == second.remote_path == str(root / f"kb.{q.delivery_id}.bin")
    assert second.bytes_sent == 0
    assert files(root) == sorted(["kb.bin", f"kb.{q.delivery_id}.bin", "nx.bin"])


def test_payload_source_is_streamed(env: DestEnv, tmp_path: Path) -> None:
    """The spool object is only read (its bytes and mode are unchanged after a delivery)."""
    src = make_file(tmp_path / "ro.bin", 3000, seed=15)
    os.chmod(src, 0o444)
    p = env.payload("/ro.bin", size=3000, seed=15)
    p = Payload(**{**p.__dict__, "source": src})
    deliver(env, p)
    assert sha256_file(src) == p.sha256 and (src.stat().st_mode & 0o777) == 0o444


@pytest.mark.parametrize("on_conflict", ["overwrite", "rename", "fail"])
def test_crash_between_publish_and_temp_removal(env: DestEnv, on_conflict: str) -> None:
    """A complete temp file and an identical final file (a crash mid-publish): one copy, no error."""
    p = env.payload("/twice.bin", size=4000, seed=16)
    data = p.source.read_bytes()
    (env.root / "twice.bin").write_bytes(data)
    write_temp(env.root / "twice.bin", p, data)
    out = deliver(env, p, on_conflict=on_conflict)
    assert out.remote_path == str(env.root / "twice.bin") and out.bytes_sent == 0
    assert files(env.root) == ["twice.bin"] and parts(env.root) == []


def test_sftp_resumes_after_dropped_connection(sftp_env: DestEnv) -> None:
    """Kill the server side mid-upload; the retry resumes from what arrived and sends less."""
    assert sftp_env.remote is not None
    srv = sftp_env.remote.sshd
    p = sftp_env.payload("/drop.bin", size=40 * 1024 * 1024, seed=17)
    temp = Path(temp_name(str(sftp_env.root / "drop.bin"), p.delivery_id))

    async def body() -> tuple[int, Outcome]:
        dest = sftp_env.make(requests=8)
        try:
            task = asyncio.create_task(dest.deliver(p))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not (temp.exists() and temp.stat().st_size >= 4 * 1024 * 1024):
                assert loop.time() < deadline and not task.done(), "upload did not start"
                await asyncio.sleep(0.005)
            for pid in srv.session_pids():
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(DestinationError) as info:
                await task
            assert info.value.retryable
            assert dest.pool.size == 0  # the broken connection is not reused
            arrived = temp.stat().st_size
            return arrived, await dest.deliver(p)
        finally:
            await dest.close()

    arrived, out = run(body())
    assert 0 < arrived < p.size
    assert out.resumed_from == arrived and out.bytes_sent == p.size - arrived < p.size
    assert out.verified == "sha256"
    assert sha256_file(sftp_env.root / "drop.bin") == p.sha256 and parts(sftp_env.root) == []
