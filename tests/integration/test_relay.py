"""Relay engine end to end: committed uploads reach their destinations, retries, relayd retry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import two_tenants
from tests.helpers import Daemon, Key, base_config, free_port, make_file, relayd, run_daemon, sha256_file, wait_for


def _states(d: Daemon, path: str) -> list[tuple[str, str]]:
    rows = [t for t in d.transfers() if t["path"] == path]
    return [(x["destination"], x["state"]) for x in rows[0]["deliveries"]] if rows else []


def _local_dest(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "local", "path": str(path), **extra}


def test_fan_out_to_two_local_destinations(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": ["a", "b"]}]))
    cfg["destinations"] = {"a": _local_dest(tmp_path / "A/{tenant}/{date}"), "b": _local_dest(tmp_path / "B")}
    with run_daemon(tmp_path / "d", cfg) as d:
        src = make_file(tmp_path / "f.bin", 3_000_000)
        r = d.sftp(keys["acme"], "acme-erp", f"mkdir /sub\nput {src} /sub/f.bin\n")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: _states(d, "/sub/f.bin") == [("a", "delivered"), ("b", "delivered")], 30,
                 interval=0.1, what="both deliveries delivered")
        t = d.transfers()[0]
        a_files = [p for p in (tmp_path / "A").rglob("*") if p.is_file()]
        assert len(a_files) == 1 and a_files[0].name == "f.bin" and a_files[0].parent.name == "sub"
        assert sha256_file(a_files[0]) == t["sha256"] == sha256_file(tmp_path / "B/sub/f.bin")
        assert not [p for p in tmp_path.rglob("*.part")]
        for x in t["deliveries"]:
            assert x["verified"] == "sha256" and x["remote_digest"] == t["sha256"]


def test_failed_delivery_then_relayd_retry(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the destination folder should be")
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": ["x"]}]))
    cfg["destinations"] = {"x": _local_dest(blocker / "out")}
    with run_daemon(tmp_path / "d", cfg) as d:
        src = make_file(tmp_path / "g.bin", 1000)
        assert d.sftp(keys["acme"], "acme-erp", f"put {src} /g.bin\n").returncode == 0
        wait_for(lambda: _states(d, "/g.bin") and _states(d, "/g.bin")[0][1] in ("retry_wait", "failed"), 30,
                 interval=0.1, what="first attempt failed")
        row = d.transfers()[0]["deliveries"][0]
        assert row["last_error"] and row["attempts"] >= 1
        blocker.unlink()
        r = relayd("retry", "-c", str(d.config_path), row["id"])
        assert r.returncode == 0, r.stderr
        wait_for(lambda: _states(d, "/g.bin") == [("x", "delivered")], 30, interval=0.1, what="delivered after retry")
        assert sha256_file(blocker / "out/g.bin") == sha256_file(src)
        assert relayd("retry", "-c", str(d.config_path), "NOSUCHID").returncode == 1
