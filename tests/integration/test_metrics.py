"""Prometheus metrics scraped from a real daemon after real transfers (OpenSSH sftp upload,
delivery to a local destination, failed logins), parsed with prometheus_client's own parser."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import argon2
import paramiko
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd import __version__
from tests.conftest import two_tenants
from tests.helpers import Key, base_config, free_port, make_file, paramiko_session, run_daemon, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, host: str = "127.0.0.1") -> tuple[str, Samples]:
    """GET /metrics; the text and every sample by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def metrics_config(tmp_path: Path, keys: dict[str, Key], mport: int, **extra: Any) -> dict[str, Any]:
    tenants = two_tenants(keys, routes=[{"match": "**", "to": ["archive", "outbox"]}])
    tenants["acme"]["users"].append({"name": "acme-pw", "password_hash": argon2.PasswordHasher().hash("pw-ok-5d1e")})
    cfg = base_config(tmp_path, free_port(), tenants)
    cfg["destinations"] = {
        "archive": {"type": "local", "path": str(tmp_path / "archive")},
        # /proc refuses new directories, even to root: every attempt fails (retryably) and the
        # next one is an hour away, so the delivery sits in retry_wait.
        "outbox": {"type": "local", "path": "/proc/relayd-test-nowhere", "retry_initial": "1h"},
    }
    cfg["metrics"] = {"listen": f"127.0.0.1:{mport}", **extra}
    return cfg


def test_metrics_after_real_transfers(tmp_path: Path, keys: dict[str, Key]) -> None:
    mport = free_port()
    cfg = metrics_config(tmp_path, keys, mport)
    payload = make_file(tmp_path / "payload.bin", 300_000, seed=7)
    with run_daemon(tmp_path, cfg) as d:
        assert f"metrics on http://127.0.0.1:{mport}/metrics" in d.log()
        _, before = scrape(mport)
        assert value(before, "relayd_build_info", version=__version__, node="gw-test",
                     python_version=next(k for (n, k) in before if n == "relayd_build_info")[1][1]) == 1
        assert value(before, "relayd_journal_readable") == 1
        assert value(before, "relayd_queue_oldest_pending_age_seconds") == 0

        # A failed public-key login (a key nobody authorized), a failed and a good password login.
        r = d.sftp(keys["stranger"], "acme-erp", "ls\n")
        assert r.returncode != 0
        transport = paramiko.Transport(("127.0.0.1", d.port))
        try:
            transport.start_client(timeout=10)
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password("acme-pw", "wrong-pw-a7c3")
        finally:
            transport.close()
        wait_for(lambda: value(scrape(mport)[1], "relayd_connections_active") == 0, what="connections closed")
        with paramiko_session(d, "acme-pw", password="pw-ok-5d1e") as sftp:
            assert sftp.listdir("/") == []
            _, during = scrape(mport)
            assert value(during, "relayd_sessions_active") == 1
            assert value(during, "relayd_connections_active") == 1
        # An upload with the OpenSSH client, delivered to archive; outbox keeps failing.
        r = d.sftp(keys["acme"], "acme-erp", f"put {payload} data.bin\n")
        assert r.returncode == 0, r.stderr

        def states() -> dict[str, str]:
            t = d.transfers()
            return {x["destination"]: x["state"] for x in t[0]["deliveries"]} if t else {}

        wait_for(lambda: states() == {"archive": "delivered", "outbox": "retry_wait"}, what="outcomes")
        wait_for(lambda: value(scrape(mport)[1], "relayd_sessions_active") == 0, what="sessions closed")
        text, m = scrape(mport)

    size = float(payload.stat().st_size)
    assert value(m, "relayd_received_files_total", tenant="acme") == 1
    assert value(m, "relayd_received_bytes_total", tenant="acme") == size
    assert value(m, "relayd_auth_attempts_total", method="publickey", result="failure") >= 1
    assert value(m, "relayd_auth_attempts_total", method="password", result="failure") == 1
    assert value(m, "relayd_auth_attempts_total", method="password", result="success") == 1
    assert value(m, "relayd_auth_attempts_total", method="publickey", result="success") == 1
    assert value(m, "relayd_deliveries_total", destination="archive", result="delivered") == 1
    assert value(m, "relayd_deliveries_total", destination="outbox", result="retry") == 1
    assert value(m, "relayd_delivery_sent_bytes_total", destination="archive") == size
    assert value(m, "relayd_delivery_size_bytes_count", destination="archive") == 1
    assert value(m, "relayd_delivery_size_bytes_sum", destination="archive") == size
    buckets = {float(dict(labels)["le"]): v for (name, labels), v in m.items()
               if name == "relayd_delivery_size_bytes_bucket" and dict(labels)["destination"] == "archive"}
    assert buckets[256 * 1024] == 0 and buckets[1024 * 1024] == 1 and buckets[float("inf")] == 1
    assert value(m, "relayd_delivery_duration_seconds_count", destination="archive") == 1
    assert 0 < (value(m, "relayd_delivery_duration_seconds_sum", destination="archive") or 0) < 30
    # Journal gauges, computed at scrape time.
    assert value(m, "relayd_queue_depth", destination="outbox", state="retry_wait") == 1
    assert value(m, "relayd_queue_depth", destination="outbox", state="pending") == 0
    assert value(m, "relayd_queue_depth", destination="archive", state="pending") == 0  # configured: zeros
    assert (value(m, "relayd_queue_oldest_pending_age_seconds") or 0) > 0
    assert value(m, "relayd_deliveries_quarantined", destination="outbox") == 0
    assert value(m, "relayd_deliveries_failed", destination="outbox") == 0
    assert value(m, "relayd_uploads_active") == 0
    assert (value(m, "process_resident_memory_bytes") or 0) > 0
    assert "_created" not in text
    # Conventions: counters end in _total, no user names or paths in label values.
    for line in text.splitlines():
        if line.startswith("# TYPE relayd_") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    assert "acme-erp" not in text and "data.bin" not in text and "acme-pw" not in text


def test_metrics_bind_the_configured_address_and_stop_with_the_daemon(tmp_path: Path, keys: dict[str, Key]) -> None:
    mport = free_port()
    cfg = metrics_config(tmp_path, keys, mport)
    with run_daemon(tmp_path, cfg) as d:
        scrape(mport)
        # Bound to 127.0.0.1 only: another loopback address (all of 127/8 is local) is refused.
        with pytest.raises(urllib.error.URLError):
            scrape(mport, host="127.0.0.2")
        # A reload that fails is visible in the metrics.
        d.config_path.write_text("node: [broken")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: value(scrape(mport)[1], "relayd_config_last_reload_successful") == 0,
                 what="failed reload in metrics")
        assert value(scrape(mport)[1], "relayd_config_reloads_total", result="failure") == 1
        assert d.stop() == 0
    with socket.socket() as s:  # nobody listens any more
        assert s.connect_ex(("127.0.0.1", mport)) != 0
    with socket.socket() as s:  # and the port can be bound again (SO_REUSEADDR: TIME_WAIT is fine, LISTEN not)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", mport))
        s.listen()


def test_metrics_port_taken_daemon_serves_anyway_and_disabled_means_no_listener(tmp_path: Path,
                                                                               keys: dict[str, Key]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        cfg = metrics_config(tmp_path / "a", keys, taken)
        with run_daemon(tmp_path / "a", cfg) as d:
            assert f"metrics: cannot listen on 127.0.0.1:{taken}" in d.log()
            assert d.sftp(keys["acme"], "acme-erp", "ls\n").returncode == 0
            assert d.stop() == 0
    mport = free_port()
    cfg = metrics_config(tmp_path / "b", keys, mport, enabled=False)
    with run_daemon(tmp_path / "b", cfg) as d:
        assert "metrics endpoint disabled" in d.log()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", mport)) != 0
        assert d.stop() == 0
