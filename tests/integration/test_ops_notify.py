"""sd_notify without systemd: the test owns the NOTIFY_SOCKET (a unix datagram socket) and checks
which messages relayd sends, when, and in which order."""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from tests.conftest import two_tenants
from tests.helpers import Key, base_config, free_port, paramiko_session, run_daemon, wait_for


@dataclass
class Message:
    """One datagram: its fields, when it arrived, and facts checked the moment it arrived."""

    fields: dict[str, str]
    at: float
    facts: dict[str, object] = field(default_factory=dict)


class NotifySocket:
    """A NOTIFY_SOCKET the test owns; ``check_ready()`` runs in the receiver thread at each READY=1."""

    def __init__(self, directory: Path):
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[Message] = []
        self.check_ready = lambda: {}  # replaced by tests: facts to record at READY=1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            msg = Message(fields, time.monotonic())
            if fields.get("READY") == "1":
                msg.facts = self.check_ready()
            self.messages.append(msg)

    def kinds(self) -> list[str]:
        """The state messages in order (READY, RELOADING, STOPPING), STATUS/WATCHDOG-only ones left out."""
        out = []
        for m in self.messages:
            for k in ("RELOADING", "READY", "STOPPING"):
                if m.fields.get(k) == "1":
                    out.append(k)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
    directory = tmp_path if len(str(tmp_path)) < 80 else Path(tempfile.mkdtemp(prefix="relayd-notify-"))
    ns = NotifySocket(directory)
    try:
        yield ns
    finally:
        ns.close()


def _connectable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_ready_after_recovery_and_listeners_then_status_reload_stopping(tmp_path: Path,
                                                                         keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": ["archive"]}]))
    cfg["destinations"] = {"archive": {"type": "local", "path": str(tmp_path / "archive")}}

    # A first run leaves a delivered transfer; then we fake a crash in the middle of its delivery
    # (state `sending`, not due for an hour) and an upload that never finished (a staging file).
    with run_daemon(tmp_path, cfg) as d:
        r = d.sftp(keys["acme"], "acme-erp", "put /etc/hostname a.txt\n")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: d.transfers()[0]["deliveries"][0]["state"] == "delivered", what="delivered")
        assert d.stop() == 0
    db = tmp_path / "state" / "journal.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE deliveries SET state = 'sending', next_attempt_at = ?", (time.time() + 3600,))
    partial = tmp_path / "spool" / "acme" / "incoming" / "01PARTIAL"
    partial.write_bytes(b"half an upload")

    with notify_socket(tmp_path) as ns:
        def at_ready() -> dict[str, object]:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                states = [r[0] for r in c.execute("SELECT state FROM deliveries")]
            return {"listening": _connectable(port), "partial_gone": not partial.exists(), "states": states}

        ns.check_ready = at_ready
        env = {"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "400000"}  # pings every 0.2 s
        with run_daemon(tmp_path, cfg, env=env) as d:
            ready = wait_for(lambda: next((m for m in ns.messages if m.fields.get("READY") == "1"), None),
                             what="READY=1")
            assert ready.facts == {"listening": True, "partial_gone": True, "states": ["pending"]}, ready.facts
            assert "STATUS" in ready.fields

            # STATUS lines carry sessions and queue depth, and follow what happens.
            with paramiko_session(d, "acme-erp", key=keys["acme"]):
                wait_for(lambda: any("1 session(s)" in m.fields.get("STATUS", "") for m in ns.messages),
                         what="STATUS with one session")
            status = ns.messages[-1].fields.get("STATUS", "")
            assert "queue: 1 pending" in status or any("queue: 1 pending" in m.fields.get("STATUS", "")
                                                       for m in ns.messages), status
            # WATCHDOG=1 keeps coming from the event loop.
            before = sum(1 for m in ns.messages if m.fields.get("WATCHDOG") == "1")
            wait_for(lambda: sum(1 for m in ns.messages if m.fields.get("WATCHDOG") == "1") >= before + 3,
                     what="watchdog pings")

            # A valid reload: RELOADING=1 (with MONOTONIC_USEC), then READY=1.
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: ns.kinds().count("READY") == 2, what="READY after reload")
            reloading = next(m for m in ns.messages if m.fields.get("RELOADING") == "1")
            assert int(reloading.fields["MONOTONIC_USEC"]) > 0
            # An invalid one: the same pair, the old config stays.
            d.config_path.write_text("node: [broken")
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: ns.kinds().count("READY") == 3, what="READY after rejected reload")
            assert "reload rejected" in d.log()
            d.config_path.write_text(yaml.safe_dump(cfg))

            assert d.stop() == 0
        kinds = ns.kinds()
        assert kinds == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], kinds
        stopping = next(m for m in ns.messages if m.fields.get("STOPPING") == "1")
        # Nothing but the STOPPING message (and no watchdog ping) after the drain began.
        assert ns.messages[-1] is stopping
        assert stopping.fields.get("STATUS", "").startswith("draining")


def test_no_notify_socket_no_messages_and_abstract_socket(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Without NOTIFY_SOCKET nothing is sent (and nothing breaks); an abstract socket (@name), as
    systemd sometimes passes, works too."""
    name = f"relayd-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(20)
    try:
        cfg = base_config(tmp_path, free_port(), two_tenants(keys))
        with run_daemon(tmp_path, cfg, env={"NOTIFY_SOCKET": "@" + name}) as d:
            first = sock.recv(65536).decode()
            while "READY=1" not in first:
                first = sock.recv(65536).decode()
            assert d.stop() == 0
    finally:
        sock.close()
