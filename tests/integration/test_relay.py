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
        table = relayd("transfers", "-c", str(d.config_path), check=True).stdout
        assert f"x: {row['state']} after" in table and "attempt(s): " in table
        blocker.unlink()
        r = relayd("retry", "-c", str(d.config_path), row["id"])
        assert r.returncode == 0, r.stderr
        wait_for(lambda: _states(d, "/g.bin") == [("x", "delivered")], 30, interval=0.1, what="delivered after retry")
        assert sha256_file(blocker / "out/g.bin") == sha256_file(src)
        assert relayd("retry", "-c", str(d.config_path), "NOSUCHID").returncode == 1


def test_retention_purges_after_all_deliveries_ended(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Spool objects are kept `retention` after the last delivery ended, then purged (transfer: purged)."""
    port = free_port()
    tenants = two_tenants(keys, routes=[{"match": "keep/**", "to": ["slow"]}, {"match": "*.bin", "to": ["a"]}],
                          retention="1s")
    cfg = base_config(tmp_path, port, tenants)
    key = keys["stranger"]
    (tmp_path / "known_hosts").write_text("")
    # Nothing listens on this port: every attempt fails retryably, so the delivery never ends.
    cfg["destinations"] = {"a": _local_dest(tmp_path / "A"),
                           "slow": {"type": "sftp", "host": "127.0.0.1", "port": free_port(), "user": "x",
                                    "identity": str(key.path), "known_hosts": str(tmp_path / "known_hosts"),
                                    "path": "/in", "retry_initial": "0.2s", "retry_max": "0.5s"}}
    with run_daemon(tmp_path / "d", cfg) as d:
        src = make_file(tmp_path / "r.bin", 5000)
        r = d.sftp(keys["acme"], "acme-erp", f"put {src} /r.bin\nmkdir /keep\nput {src} /keep/k.dat\nput {src} /u.txt\n")
        assert r.returncode == 0, r.stderr
        objects = d.spool / "acme" / "objects"

        def state(path: str) -> str:
            return next(t["state"] for t in d.transfers() if t["path"] == path)
        wait_for(lambda: state("/r.bin") == "purged" and state("/u.txt") == "purged", 30, interval=0.2,
                 what="delivered and unrouted transfers purged after retention")
        assert sha256_file(tmp_path / "A/r.bin") == sha256_file(src)  # the delivered copy stays
        assert not (d.inbox("acme") / "r.bin").exists()
        # /keep/k.dat's delivery keeps failing retryably (not terminal): its object stays.
        assert state("/keep/k.dat") == "committed"
        kept = next(t for t in d.transfers() if t["path"] == "/keep/k.dat")
        assert (objects / kept["object"]).exists() and (d.inbox("acme") / "keep/k.dat").exists()
        assert len(list(objects.iterdir())) == 1


def test_deliveries_of_a_removed_destination_wait_and_are_reported(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Removing a destination by reload drops nothing: its queued deliveries wait, with a warning,
    and go out when it is configured again."""
    import signal

    import yaml

    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": ["later"]}]))
    (tmp_path / "known_hosts").write_text("")
    # Nothing listens on this port: every attempt fails retryably.
    cfg["destinations"] = {"later": {"type": "sftp", "host": "127.0.0.1", "port": free_port(), "user": "x",
                                     "identity": str(keys["stranger"].path),
                                     "known_hosts": str(tmp_path / "known_hosts"), "path": "/in",
                                     "retry_initial": "0.2s", "retry_max": "0.5s"}}
    with run_daemon(tmp_path / "d", cfg) as d:
        src = make_file(tmp_path / "w.bin", 4000)
        assert d.sftp(keys["acme"], "acme-erp", f"put {src} /w.bin\n").returncode == 0
        wait_for(lambda: "delivery attempt failed" in d.log(), 30, interval=0.1, what="a failed attempt")
        removed = {**cfg, "destinations": {}, "tenants": two_tenants(keys)}
        d.config_path.write_text(yaml.safe_dump(removed))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "wait for destination 'later', which is not in the config" in d.log(), 30,
                 what="orphan warning")
        assert _states(d, "/w.bin")[0][1] in ("retry_wait", "pending")
        d.config_path.write_text(yaml.safe_dump({**cfg, "destinations": {"later": _local_dest(tmp_path / "out")}}))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _states(d, "/w.bin") == [("later", "delivered")], 30, interval=0.1,
                 what="delivered once configured again")
        assert sha256_file(tmp_path / "out/w.bin") == sha256_file(src)
