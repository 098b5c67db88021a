"""Connection floods and silent clients are cut off; everyone else keeps working."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.conftest import two_tenants
from tests.helpers import Key, base_config, free_port, make_file, run_daemon, sha256_file, wait_for


def _hold(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_by_server(s: socket.socket, timeout: float = 10) -> bool:
    """True once the server closed the socket (reads EOF or reset), waiting up to ``timeout``."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = s.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def test_max_startups_drops_excess_unauthenticated(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys), max_startups=3, login_timeout=60)
    with run_daemon(tmp_path, cfg) as d:
        held = [_hold(port) for _ in range(3)]
        wait_for(lambda: d.log().count("connection conn=") >= 3, what="3 connections accepted")
        extra = _hold(port)
        assert _closed_by_server(extra), "4th unauthenticated connection was not dropped"
        assert "refused: connection flood" in d.log()
        for s in held:
            s.close()
        src = make_file(tmp_path / "a.bin", 4096)

        def upload_ok() -> bool:
            return d.sftp(keys["acme"], "acme-erp", f"put {src} /a.bin\n").returncode == 0
        wait_for(upload_ok, 20, interval=0.2, what="upload after the flood ended")
        assert d.transfers()[0]["sha256"] == sha256_file(src)


def test_per_ip_limit(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys), max_connections_per_ip=2)
    with run_daemon(tmp_path, cfg) as d:
        held = [_hold(port) for _ in range(2)]
        wait_for(lambda: d.log().count("connection conn=") >= 2, what="2 connections accepted")
        extra = _hold(port)
        assert _closed_by_server(extra)
        r = d.sftp(keys["acme"], "acme-erp", "ls\n")
        assert r.returncode != 0
        held[0].close()
        wait_for(lambda: d.sftp(keys["acme"], "acme-erp", "ls\n").returncode == 0, 20, interval=0.2,
                 what="login once a slot is free")
        held[1].close()


def test_login_timeout_closes_silent_client(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys), login_timeout="1s")
    with run_daemon(tmp_path, cfg):
        s = _hold(port)
        assert _closed_by_server(s, timeout=15), "silent client was not disconnected"


def test_huge_sftp_packet_ends_only_that_session(daemon, keys: dict[str, Key], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A client announcing a 4 GiB SFTP packet is cut off; other sessions keep working."""
    import paramiko

    from tests.helpers import paramiko_client

    good = paramiko_client(daemon, "acme-erp", keys["acme"])
    t = paramiko.Transport(("127.0.0.1", daemon.port))
    t.start_client(timeout=10)
    t.auth_publickey("globex-1", paramiko.Ed25519Key.from_private_key_file(str(keys["globex"].path)))
    chan = t.open_session()
    chan.invoke_subsystem("sftp")
    chan.sendall(b"\x00\x00\x00\x05\x01\x00\x00\x00\x03")  # INIT v3
    chan.settimeout(10)
    assert chan.recv(4096)  # VERSION
    chan.sendall(b"\xff\xff\xff\xf0" + b"\x06" + b"x" * 1000)
    wait_for(lambda: chan.closed or chan.exit_status_ready() or chan.recv_ready() and not chan.recv(4096),
             15, what="hostile session closed")
    with good.open("/still-works.txt", "w") as f:
        f.write("ok")
    assert any(r["path"] == "/still-works.txt" for r in daemon.transfers())
    t.close()


def test_idle_session_is_closed(tmp_path: Path, keys: dict[str, Key]) -> None:
    """gateway.idle_timeout closes a logged-in session that sends nothing."""
    from tests.helpers import paramiko_client

    port = free_port()
    with run_daemon(tmp_path, base_config(tmp_path, port, two_tenants(keys), idle_timeout="1s")) as d:
        sftp = paramiko_client(d, "acme-erp", keys["acme"])
        transport = sftp.get_channel().get_transport()
        wait_for(lambda: not transport.is_active(), 15, what="idle connection closed")
        assert "closing idle connection" in d.log()
