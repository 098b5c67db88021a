"""SIGTERM drains: listeners close, uploads in progress finish (until gateway.drain_timeout),
delivery attempts still running are cancelled and checkpointed, exit 0, nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import two_tenants
from tests.helpers import (Key, base_config, free_port, make_key, paramiko_session, relayd, run_daemon,
                           sha256_file, wait_for)


def black_hole() -> socket.socket:
    """A TCP port that accepts connections (the kernel does) but never says a word: an SSH
    connection to it waits for the server's banner, so a delivery there stays in flight."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def journal_deliveries(config_path: Path) -> list[dict[str, Any]]:
    out = relayd("transfers", "-c", str(config_path), "--json", check=True)
    return [dict(x, path=t["path"]) for t in json.loads(out.stdout) for x in t["deliveries"]]


def test_sigterm_lets_uploads_finish_and_checkpoints_deliveries(tmp_path: Path, keys: dict[str, Key]) -> None:
    hole = black_hole()
    ident = make_key(tmp_path / "k", "relay-id")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{hole.getsockname()[1]} {ident.pub}\n")
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": ["remote"]}]),
                      drain_timeout="4s")
    cfg["destinations"] = {"remote": {
        "type": "sftp", "host": "127.0.0.1", "port": hole.getsockname()[1], "user": "nobody",
        "identity": str(ident.path), "known_hosts": str(known_hosts), "path": "/upload",
        "connect_timeout": "10m"}}
    first = os.urandom(300_000)
    second = os.urandom(700_000)
    try:
        with run_daemon(tmp_path, cfg) as d:
            # A committed file whose delivery hangs in the black hole: in flight at SIGTERM.
            r = d.sftp(keys["acme"], "acme-erp", f"put {tmp_path / 'k' / 'relay-id.pub'} early.pub\n")
            assert r.returncode == 0, r.stderr
            wait_for(lambda: [x["state"] for x in journal_deliveries(d.config_path)] == ["sending"],
                     what="delivery in flight")
            with paramiko_session(d, "acme-erp", key=keys["acme"]) as sftp:
                f = sftp.open("/big.bin", "wb")
                f.write(first)
                t0 = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: "draining: waiting for 1 upload(s)" in d.log(), what="drain started")
                # Listeners are closed: no new connections.
                with socket.socket() as s:
                    assert s.connect_ex(("127.0.0.1", port)) != 0
                # No new uploads in the sessions that are open ...
                with pytest.raises(IOError):
                    sftp.open("/late.bin", "wb")
                # ... but the one in progress finishes and is committed.
                f.write(second)
                f.close()
                assert sftp.stat("/big.bin").st_size == len(first) + len(second)
            assert d.proc.wait(timeout=30) == 0
            took = time.monotonic() - t0
            assert took < 4 + 10, took  # drain_timeout plus closing and checkpointing
            log = d.log()
            assert "relay: checkpointed 1 interrupted delivery attempt(s) as pending" in log
            assert "Traceback" not in log and "crashed" not in log, log
    finally:
        hole.close()

    rows = {x["path"]: x for x in journal_deliveries(d.config_path)}
    assert set(rows) == {"/early.pub", "/big.bin"}
    # The interrupted attempt is pending again (not left `sending`), with the reason.
    assert rows["/early.pub"]["state"] == "pending"
    assert rows["/early.pub"]["last_error"] == "interrupted by shutdown; resumes at the next start"
    # The file committed during the drain waits too (the relay claimed nothing new).
    assert rows["/big.bin"]["state"] == "pending" and rows["/big.bin"]["attempts"] == 0
    transfers = json.loads(relayd("transfers", "-c", str(d.config_path), "--json", check=True).stdout)
    big = next(t for t in transfers if t["path"] == "/big.bin")
    assert big["sha256"] == hashlib.sha256(first + second).hexdigest()

    # Nothing lost: the next start delivers both (the destination now reachable: a local folder).
    cfg["destinations"] = {"remote": {"type": "local", "path": str(tmp_path / "remote")}}
    with run_daemon(tmp_path, cfg) as d2:
        wait_for(lambda: all(x["state"] == "delivered" for x in journal_deliveries(d2.config_path)),
                 what="both delivered after restart")
        assert sha256_file(tmp_path / "remote" / "big.bin") == big["sha256"]
        assert (tmp_path / "remote" / "early.pub").read_text() == ident.pub + "\n"
        assert d2.stop() == 0


def test_drain_timeout_cuts_unfinished_uploads_and_commits_nothing(tmp_path: Path, keys: dict[str, Key]) -> None:
    cfg = base_config(tmp_path, free_port(), two_tenants(keys), drain_timeout="1s")
    with run_daemon(tmp_path, cfg) as d:
        with paramiko_session(d, "acme-erp", key=keys["acme"]) as sftp:
            f = sftp.open("/never-closed.bin", "wb")
            f.write(b"x" * 100_000)
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(timeout=20) == 0
            assert time.monotonic() - t0 < 1 + 7
            with pytest.raises((IOError, EOFError)):
                f.write(b"y" * 100_000)
                f.close()
        assert "drain timeout: 1 upload(s) still open are cut off" in d.log()
    assert json.loads(relayd("transfers", "-c", str(d.config_path), "--json", check=True).stdout) == []
    assert not (tmp_path / "spool" / "acme" / "inbox" / "never-closed.bin").exists()
