"""Durability and limits: nothing lost, nothing half-committed, every limit refused cleanly.

Each test starts its own relayd (a real subprocess) with the config it needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import paramiko
import pytest

from tests.conftest import ALL_PERMS, two_tenants
from tests.helpers import (Daemon, Key, base_config, free_port, make_file, paramiko_client, run_daemon,
                           sha256_file, start_daemon, wait_for)

MiB = 1024 * 1024


# -- small helpers ---------------------------------------------------------------------------------


def tenant(name: str, keys: dict[str, Key], perms: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A tenant with one user ``<name>-u`` (key ``acme``) holding ``perms`` (all by default)."""
    return {"users": [{"name": f"{name}-u", "authorized_keys": [keys["acme"].pub],
                       "permissions": ALL_PERMS if perms is None else perms}], **extra}


@contextlib.contextmanager
def gateway(tmp_path: Path, tenants: dict[str, Any], **gw: Any) -> Iterator[Daemon]:
    """A relayd on a free port with ``tenants`` and gateway options ``gw``."""
    port = free_port()
    with run_daemon(tmp_path / "gw", base_config(tmp_path / "gw", port, tenants, **gw)) as d:
        yield d


@contextlib.contextmanager
def sftp_session(d: Daemon, user: str, key: Key) -> Iterator[paramiko.SFTPClient]:
    """A paramiko SFTP client whose transport is closed on exit."""
    sftp = paramiko_client(d, user, key)
    try:
        yield sftp
    finally:
        sftp.get_channel().get_transport().close()


def drop(sftp: paramiko.SFTPClient) -> None:
    """End the TCP connection abruptly: no SFTP close, no channel close, no SSH disconnect."""
    t = sftp.get_channel().get_transport()
    with contextlib.suppress(OSError):
        t.sock.shutdown(socket.SHUT_RDWR)
    t.close()


def incoming(d: Daemon, name: str = "acme") -> list[Path]:
    """Staging files of uploads in progress for tenant ``name``."""
    return sorted((d.spool / name / "incoming").iterdir())


def rows_for(d: Daemon, vpath: str) -> list[dict[str, Any]]:
    """Journal rows for one client path."""
    return [t for t in d.transfers() if t["path"] == vpath]


def object_of(d: Daemon, row: dict[str, Any]) -> Path:
    """The spool object of a transfer row."""
    return d.spool / row["tenant"] / "objects" / row["object"]


def put_bytes(sftp: paramiko.SFTPClient, vpath: str, data: bytes) -> None:
    """Write ``data`` to ``vpath`` and close the handle (the commit)."""
    with sftp.open(vpath, "wb") as f:
        f.write(data)


# -- crashes and disconnects -----------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_during_upload_loses_nothing(tmp_path: Path, keys: dict[str, Key]) -> None:
    """kill -9 mid-upload: the partial is dropped at restart, earlier commits and the journal survive."""
    first = make_file(tmp_path / "first.bin", 3 * MiB + 5, seed=1)
    big = make_file(tmp_path / "big.bin", 200 * MiB, seed=2)
    port = free_port()
    workdir = tmp_path / "gw"
    config = base_config(workdir, port, two_tenants(keys))
    d = start_daemon(workdir, config)
    try:
        r = d.sftp(keys["acme"], "acme-erp", f"put {first} /first.bin\n")
        assert r.returncode == 0, r.stderr
        [committed] = d.transfers()
        # -l (Kbit/s) keeps the upload in flight long enough to be caught mid-way.
        client = subprocess.Popen(
            ["sftp", "-b", "-", "-l", "400000", "-P", str(port), "-i", str(keys["acme"].path),
             "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "acme-erp@127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdin is not None
        client.stdin.write(f"put {big} /big.bin\n")
        client.stdin.close()
        try:
            wait_for(lambda: any(p.stat().st_size > 16 * MiB for p in incoming(d)), 60,
                     what="staging file > 16 MiB")
            d.kill9()
            assert client.wait(timeout=60) != 0
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert incoming(d), "the partial staging file should still be there before recovery"

        d = start_daemon(workdir, config, port=port)
        assert incoming(d) == []
        assert d.transfers() == [committed]
        assert committed["sha256"] == sha256_file(first)
        assert sha256_file(object_of(d, committed)) == committed["sha256"]
        assert sha256_file(d.inbox("acme") / "first.bin") == committed["sha256"]
        assert not (d.inbox("acme") / "big.bin").exists()
        assert sorted(p.name for p in (d.spool / "acme" / "objects").iterdir()) == [committed["object"]]

        r = d.sftp(keys["acme"], "acme-erp", f"put {big} /big.bin\n")
        assert r.returncode == 0, r.stderr
        [again] = rows_for(d, "/big.bin")
        assert again["sha256"] == sha256_file(big) == sha256_file(d.inbox("acme") / "big.bin")
        assert len(d.transfers()) == 2
        assert incoming(d) == []
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_disconnect_mid_upload_commits_nothing(daemon: Daemon, keys: dict[str, Key]) -> None:
    """A connection dropped with a write handle open commits nothing and leaves no partial file."""
    sftp = paramiko_client(daemon, "acme-erp", keys["acme"])
    f = sftp.open("/dropped.bin", "wb")
    chunk = os.urandom(MiB)
    for _ in range(4):
        f.write(chunk)
    f.flush()
    wait_for(lambda: any(p.stat().st_size >= 4 * MiB for p in incoming(daemon)), what="4 MiB staged")
    drop(sftp)
    # The journal row is written before the staging file leaves incoming/, so once incoming/
    # is empty a (wrong) commit would already be visible in the journal.
    wait_for(lambda: incoming(daemon) == [], what="incoming/ empty after disconnect")
    assert daemon.transfers() == []
    assert list(daemon.inbox("acme").iterdir()) == []
    with sftp_session(daemon, "acme-erp", keys["acme"]) as s2:
        put_bytes(s2, "/after.bin", b"still works")
    assert [t["path"] for t in daemon.transfers()] == ["/after.bin"]


def test_overwrite_keeps_committed_object(daemon: Daemon, keys: dict[str, Key], tmp_path: Path) -> None:
    """Overwriting /x makes a second transfer; the first object keeps A; a user without overwrite is refused."""
    a = make_file(tmp_path / "a.bin", 2 * MiB, seed=10)
    b = make_file(tmp_path / "b.bin", MiB + 3, seed=11)
    for src in (a, b):
        r = daemon.sftp(keys["acme"], "acme-erp", f"put {src} /x\n")
        assert r.returncode == 0, r.stderr
    first, second = rows_for(daemon, "/x")
    assert first["sha256"] == sha256_file(a)
    assert second["sha256"] == sha256_file(b)
    assert first["object"] != second["object"]
    assert sha256_file(object_of(daemon, first)) == sha256_file(a)
    assert sha256_file(object_of(daemon, second)) == sha256_file(b)
    assert sha256_file(daemon.inbox("acme") / "x") == sha256_file(b)

    # acme-drop has the default permissions (upload, list, mkdir): no overwrite.
    r = daemon.sftp(keys["acme2"], "acme-drop", f"put {a} /x\n")
    assert r.returncode != 0
    assert "denied" in r.stderr.lower()
    with sftp_session(daemon, "acme-drop", keys["acme2"]) as s:
        with pytest.raises(PermissionError):
            put_bytes(s, "/x", b"replacement")
    assert len(rows_for(daemon, "/x")) == 2
    assert sha256_file(daemon.inbox("acme") / "x") == sha256_file(b)
    assert sha256_file(object_of(daemon, first)) == sha256_file(a)
    assert incoming(daemon) == []


# -- quotas and size limits ------------------------------------------------------------------------


def test_byte_quota_refuses_upload_with_message(tmp_path: Path, keys: dict[str, Key]) -> None:
    """A 2 MiB upload into a 1 MiB quota fails with a "quota" message; nothing is kept; others work."""
    big = make_file(tmp_path / "big.bin", 2 * MiB, seed=3)
    small = make_file(tmp_path / "small.bin", 512 * 1024, seed=4)
    with gateway(tmp_path, {"q": tenant("q", keys, quota={"bytes": "1MiB"})}) as d:
        with sftp_session(d, "q-u", keys["acme"]) as s:
            # Plain (unpipelined) writes: paramiko's put() pipelines and its close() swallows
            # errors, so the server's message would be lost there.
            with pytest.raises(IOError, match="(?i)quota"):
                put_bytes(s, "/big.bin", big.read_bytes())
            wait_for(lambda: incoming(d, "q") == [], what="partial removed")
            assert d.transfers() == []
            assert not (d.inbox("q") / "big.bin").exists()
            s.put(str(small), "/small.bin")
        r = d.sftp(keys["acme"], "q-u", f"put {big} /big2.bin\n")
        # OpenSSH sftp prints only the status name ("Failure") for WRITE errors, not the message.
        assert r.returncode != 0
        assert "failure" in r.stderr.lower()
        assert [t["path"] for t in d.transfers()] == ["/small.bin"]
        assert sha256_file(d.inbox("q") / "small.bin") == sha256_file(small)
        assert sorted(p.name for p in d.inbox("q").iterdir()) == ["small.bin"]
        assert incoming(d, "q") == []


def test_file_quota(tmp_path: Path, keys: dict[str, Key]) -> None:
    """quota.files = 3: three files are accepted, the fourth is refused with a "quota" message."""
    with gateway(tmp_path, {"q": tenant("q", keys, quota={"files": 3})}) as d:
        with sftp_session(d, "q-u", keys["acme"]) as s:
            for i in range(3):
                put_bytes(s, f"/f{i}", b"data %d" % i)
            with pytest.raises(IOError, match="(?i)quota"):
                s.open("/f3", "wb")
            # Overwriting an existing name does not need a new file slot.
            put_bytes(s, "/f0", b"new data")
        assert [t["path"] for t in d.transfers()] == ["/f0", "/f1", "/f2", "/f0"]
        assert sorted(p.name for p in d.inbox("q").iterdir()) == ["f0", "f1", "f2"]
        assert incoming(d, "q") == []


def test_max_file_size(tmp_path: Path, keys: dict[str, Key]) -> None:
    """A file over ``max_file_size`` is refused with a clear message; one at the limit is accepted."""
    with gateway(tmp_path, {"q": tenant("q", keys, max_file_size="1MiB")}) as d:
        with sftp_session(d, "q-u", keys["acme"]) as s:
            with pytest.raises(IOError, match="(?i)too large"):
                put_bytes(s, "/big.bin", b"\0" * (MiB + 1))
            wait_for(lambda: incoming(d, "q") == [], what="partial removed")
            put_bytes(s, "/exact.bin", b"\1" * MiB)
        assert [(t["path"], t["size"]) for t in d.transfers()] == [("/exact.bin", MiB)]
        assert sorted(p.name for p in d.inbox("q").iterdir()) == ["exact.bin"]


def test_sparse_write_past_quota_refused(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Seeking to 1 GiB and writing one byte under a 100 MiB quota is refused and the partial removed."""
    with gateway(tmp_path, {"q": tenant("q", keys, quota={"bytes": "100MiB"})}) as d:
        with sftp_session(d, "q-u", keys["acme"]) as s:
            f = s.open("/sparse.bin", "wb")
            f.write(b"head")
            f.flush()
            f.seek(1 << 30)
            with pytest.raises(IOError, match="(?i)quota"):
                f.write(b"x")
                f.flush()
            with contextlib.suppress(IOError):
                f.close()  # the handle has failed; the server refuses to commit it
            wait_for(lambda: incoming(d, "q") == [], what="partial removed")
            # The refused reservation was not kept: 100 MiB minus nothing is still free.
            put_bytes(s, "/ok.bin", b"\2" * (99 * MiB))
        assert [t["path"] for t in d.transfers()] == ["/ok.bin"]
        assert sorted(p.name for p in d.inbox("q").iterdir()) == ["ok.bin"]


def test_quota_freed_by_delete(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Deleting a file gives its bytes back to the tenant quota."""
    with gateway(tmp_path, {"q": tenant("q", keys, quota={"bytes": "1MiB"})}) as d:
        with sftp_session(d, "q-u", keys["acme"]) as s:
            put_bytes(s, "/a.bin", b"a" * (700 * 1024))
            with pytest.raises(IOError, match="(?i)quota"):
                put_bytes(s, "/b.bin", b"b" * (700 * 1024))
            wait_for(lambda: incoming(d, "q") == [], what="partial removed")
            s.remove("/a.bin")
            put_bytes(s, "/b.bin", b"b" * (700 * 1024))
        assert [t["path"] for t in d.transfers()] == ["/a.bin", "/b.bin"]
        assert sorted(p.name for p in d.inbox("q").iterdir()) == ["b.bin"]


# -- commit: rename --------------------------------------------------------------------------------


def test_rename_commit_mode(tmp_path: Path, keys: dict[str, Key]) -> None:
    """``commit: rename``: a temp name commits on rename to a final name; final names commit at close."""
    a = make_file(tmp_path / "a.csv", 3 * MiB + 1, seed=20)
    b = make_file(tmp_path / "b.csv", 1000, seed=21)
    with gateway(tmp_path, {"r": tenant("r", keys, commit="rename")}) as d:
        with sftp_session(d, "r-u", keys["acme"]) as s:
            s.put(str(a), "/a.csv.filepart")
            assert d.transfers() == []
            s.rename("/a.csv.filepart", "/a.csv")
            [row] = d.transfers()
            assert (row["path"], row["size"], row["sha256"]) == ("/a.csv", a.stat().st_size, sha256_file(a))
            assert sha256_file(object_of(d, row)) == sha256_file(a)
            assert sha256_file(d.inbox("r") / "a.csv") == sha256_file(a)
            assert not (d.inbox("r") / "a.csv.filepart").exists()

            s.put(str(b), "/b.csv")
            assert [t["path"] for t in d.transfers()] == ["/a.csv", "/b.csv"]
            assert rows_for(d, "/b.csv")[0]["sha256"] == sha256_file(b)

        dropped = paramiko_client(d, "r-u", keys["acme"])
        put_bytes(dropped, "/c.csv.filepart", b"never renamed")
        drop(dropped)
        with sftp_session(d, "r-u", keys["acme"]) as s:
            put_bytes(s, "/d.csv", b"barrier")
        assert [t["path"] for t in d.transfers()] == ["/a.csv", "/b.csv", "/d.csv"]
        assert not any(t["path"].startswith("/c.csv") for t in d.transfers())
        assert incoming(d, "r") == []


# -- session limits --------------------------------------------------------------------------------


def test_max_handles_per_session(tmp_path: Path, keys: dict[str, Key]) -> None:
    """The 5th open handle (limit 4) is refused; the session keeps working and commits normally."""
    with gateway(tmp_path, {"h": tenant("h", keys)}, max_handles_per_session=4) as d:
        with sftp_session(d, "h-u", keys["acme"]) as s:
            open_files = [s.open(f"/h{i}", "wb") for i in range(4)]
            with pytest.raises(IOError, match="(?i)too many open handles"):
                s.open("/h4", "wb")
            with pytest.raises(IOError, match="(?i)too many open handles"):
                s.listdir("/")
            for i, f in enumerate(open_files):
                f.write(b"handle %d" % i)
                f.close()
            put_bytes(s, "/h4", b"fifth, after the others closed")
            assert sorted(s.listdir("/")) == ["h0", "h1", "h2", "h3", "h4"]
        assert sorted(t["path"] for t in d.transfers()) == ["/h0", "/h1", "/h2", "/h3", "/h4"]


def test_max_sessions_per_user(tmp_path: Path, keys: dict[str, Key]) -> None:
    """A third concurrent session (limit 2) is refused; the two open ones keep working."""
    with gateway(tmp_path, {"s": tenant("s", keys)}, max_sessions_per_user=2) as d:
        s1 = paramiko_client(d, "s-u", keys["acme"])
        transport = s1.get_channel().get_transport()
        try:
            s2 = paramiko.SFTPClient.from_transport(transport)  # second channel, same connection
            with pytest.raises(paramiko.SSHException):
                paramiko.SFTPClient.from_transport(transport)
            r = d.sftp(keys["acme"], "s-u", "ls /\n")  # another connection, same user
            assert r.returncode != 0
            put_bytes(s1, "/one", b"1")
            put_bytes(s2, "/two", b"2")
            s2.close()

            def third_session_ok() -> bool:
                try:
                    s3 = paramiko.SFTPClient.from_transport(transport)
                except paramiko.SSHException:
                    return False
                put_bytes(s3, "/three", b"3")
                s3.close()
                return True

            wait_for(third_session_ok, what="a session slot freed after one closed")
        finally:
            transport.close()
        assert sorted(t["path"] for t in d.transfers()) == ["/one", "/three", "/two"]


# -- signals ---------------------------------------------------------------------------------------


def test_sigterm_idle_exits_zero(daemon: Daemon) -> None:
    """SIGTERM on an idle daemon stops it with exit code 0."""
    assert daemon.stop() == 0


def test_journal_failure_fails_the_close_and_stores_nothing(daemon: Daemon, keys: dict[str, Key],
                                                            tmp_path: Path) -> None:
    """If the journal can't record the transfer, the client's close fails and nothing is stored."""
    import sqlite3

    db = Path(daemon.config["node"]["state_dir"]) / "journal.db"
    src = make_file(tmp_path / "j.bin", 100_000)
    blocker = sqlite3.connect(db, timeout=1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # relayd's insert waits its busy timeout, then fails
    try:
        r = daemon.sftp(keys["acme"], "acme-erp", f"put {src} /j.bin\n")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert r.returncode != 0, "close succeeded although the journal could not record the transfer"
    assert str(db) not in r.stderr
    wait_for(lambda: "commit failed" in daemon.log(), what="commit failure logged")
    objects = daemon.spool / "acme" / "objects"
    assert not (daemon.inbox("acme") / "j.bin").exists()
    assert not any((daemon.spool / "acme" / "incoming").iterdir())
    assert not any(objects.iterdir())
    assert daemon.transfers() == []
    r = daemon.sftp(keys["acme"], "acme-erp", f"put {src} /j.bin\n")
    assert r.returncode == 0, r.stderr
    assert [t["path"] for t in daemon.transfers()] == ["/j.bin"]


def test_df_reports_the_tenant_quota(tmp_path: Path, keys: dict[str, Key]) -> None:
    """statvfs (``df`` in sftp) shows the tenant's quota and what is left of it."""
    port = free_port()
    tenants = two_tenants(keys, quota={"bytes": "100MiB", "files": 50})
    with run_daemon(tmp_path, base_config(tmp_path, port, tenants)) as d:
        sftp = paramiko_client(d, "acme-erp", keys["acme"])
        with sftp.open("/a.bin", "w") as f:
            f.write(b"x" * (10 << 20))
        msg = sftp._request(paramiko.sftp.CMD_EXTENDED, "statvfs@openssh.com", "/")[1]
        fields = [msg.get_int64() for _ in range(11)]
        _bsize, frsize, blocks, _bfree, bavail, files, ffree = fields[:7]
        assert blocks * frsize == 100 << 20
        assert bavail * frsize == 90 << 20
        assert files == 50 and ffree == 49
