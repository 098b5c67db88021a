"""``relayd status``, ``show`` and ``cancel`` against the journal of a running daemon."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import yaml

from relayd import __version__
from tests.conftest import two_tenants
from tests.helpers import Daemon, Key, base_config, free_port, relayd, run_daemon, start_daemon, wait_for

# /proc refuses new directories, even to root: attempts to this path fail (retryably).
NOWHERE = "/proc/relayd-test-nowhere"


def admin_config(tmp_path: Path, keys: dict[str, Key]) -> dict[str, Any]:
    cfg = base_config(tmp_path, free_port(), two_tenants(keys, routes=[{"match": "**", "to": ["archive", "outbox"]}]))
    cfg["destinations"] = {
        "archive": {"type": "local", "path": str(tmp_path / "archive")},
        "outbox": {"type": "local", "path": NOWHERE, "retry_initial": "1h"},  # parks in retry_wait
    }
    return cfg


def cli(d: Daemon, *args: str) -> Any:
    return relayd(*args, "-c", str(d.config_path))


def upload(d: Daemon, keys: dict[str, Key], name: str) -> dict[str, Any]:
    r = d.sftp(keys["acme"], "acme-erp", f"put /etc/hostname {name}\n")
    assert r.returncode == 0, r.stderr
    return wait_for(lambda: next((t for t in d.transfers() if t["path"] == f"/{name}" and
                                  {x["destination"]: x["state"] for x in t["deliveries"]} ==
                                  {"archive": "delivered", "outbox": "retry_wait"}), None), what=f"{name} parked")


def test_status_running_stopped_and_one_daemon_per_state_dir(tmp_path: Path, keys: dict[str, Key]) -> None:
    cfg = admin_config(tmp_path, keys)
    with run_daemon(tmp_path, cfg) as d:
        upload(d, keys, "a.txt")
        r = cli(d, "status")
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert f"relayd {__version__}  node gw-test" in out
        assert f"running (pid {d.proc.pid}" in out
        assert "transfers:   1 committed" in out
        assert "1 delivered" in out and "1 retry_wait" in out
        assert "oldest waiting delivery: " in out and "to outbox, retry_wait" in out
        lines = out.splitlines()
        header = next(ln for ln in lines if ln.startswith("DESTINATION"))
        assert header.split() == ["DESTINATION", "PENDING", "RETRY_WAIT", "SENDING", "FAILED", "QUARANTINED"]
        assert next(ln for ln in lines if ln.startswith("outbox")).split() == ["outbox", "0", "1", "0", "0", "0"]
        assert next(ln for ln in lines if ln.startswith("archive")).split() == ["archive", "0", "0", "0", "0", "0"]

        info = json.loads(cli(d, "status", "--json").stdout)
        assert info["daemon"]["running"] is True and info["daemon"]["pid"] == d.proc.pid
        assert info["node"] == "gw-test" and info["version"] == __version__
        assert info["transfers"] == {"committed": 1}
        assert info["deliveries"] == {"delivered": 1, "retry_wait": 1}
        assert info["oldest_waiting"]["destination"] == "outbox" and info["oldest_waiting"]["age_seconds"] >= 0
        assert "No such file or directory" in info["oldest_waiting"]["last_error"]
        assert info["destinations"]["outbox"]["retry_wait"] == 1

        # A second daemon on the same state_dir refuses to start, naming the first.
        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump({**cfg, "gateway": {"listen": [f"127.0.0.1:{free_port()}"]}}))
        r = relayd("serve", "-c", str(other), timeout=60)
        assert r.returncode == 1
        assert f"another relayd (pid {d.proc.pid}) is running" in r.stderr
        assert "Traceback" not in r.stderr

        assert d.stop() == 0
        r = cli(d, "status")
        assert r.returncode == 3 and "daemon:      not running" in r.stdout
        assert not (tmp_path / "state" / "relayd.pid").exists()

    # kill -9 leaves the pid file behind, but not the lock: "not running", and a new start works.
    d = start_daemon(tmp_path, cfg)
    try:
        d.kill9()
        assert (tmp_path / "state" / "relayd.pid").exists()
        r = cli(d, "status")
        assert r.returncode == 3 and "not running" in r.stdout
    finally:
        d.stop()
    with run_daemon(tmp_path, cfg) as d:
        assert cli(d, "status").returncode == 0
        assert d.stop() == 0


def test_show_transfer_and_delivery(tmp_path: Path, keys: dict[str, Key]) -> None:
    with run_daemon(tmp_path, admin_config(tmp_path, keys)) as d:
        t = upload(d, keys, "a.txt")
        archive = next(x for x in t["deliveries"] if x["destination"] == "archive")
        r = cli(d, "show", t["id"])
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert out.startswith(f"transfer {t['id']}\n")
        for field in ("tenant:", "acme", "user:", "acme-erp", "path:", "/a.txt", t["sha256"], "received_at:"):
            assert field in out, field
        assert "signature valid" in out and f"sha256: {t['sha256']}" in out
        assert archive["id"] in out and "delivered" in out and "retry_wait" in out

        r = cli(d, "show", archive["id"])
        assert r.returncode == 0 and r.stdout.startswith(f"delivery {archive['id']}\n")
        assert "remote_path:" in r.stdout and str(tmp_path / "archive") in r.stdout
        assert f"transfer {t['id']}" in r.stdout

        doc = json.loads(cli(d, "show", archive["id"], "--json").stdout)
        assert doc["kind"] == "delivery" and doc["delivery"]["state"] == "delivered"
        assert doc["transfer"]["id"] == t["id"] and len(doc["deliveries"]) == 2
        assert doc["manifest"]["signature"] == "valid" and doc["manifest"]["gateway"] == "gw-test"

        r = cli(d, "show", "01NOSUCHID0000000000000000")
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == "relayd: no transfer or delivery with id 01NOSUCHID0000000000000000\n"
        assert d.stop() == 0


def test_cancel_is_honoured_by_the_running_daemon(tmp_path: Path, keys: dict[str, Key]) -> None:
    cfg = admin_config(tmp_path, keys)
    with run_daemon(tmp_path, cfg) as d:
        t1 = upload(d, keys, "one.txt")
        t2 = upload(d, keys, "two.txt")
        out1 = next(x for x in t1["deliveries"] if x["destination"] == "outbox")
        out2 = next(x for x in t2["deliveries"] if x["destination"] == "outbox")

        # By transfer id: the unfinished delivery is cancelled, the delivered one says so.
        r = cli(d, "cancel", t1["id"])
        assert r.returncode == 0, r.stderr
        lines = dict(ln.split("  ", 1) for ln in r.stdout.splitlines())
        assert lines[out1["id"]] == "outbox  cancelled  cancelled"
        assert "already delivered" in next(v for k, v in lines.items() if k != out1["id"])
        again = json.loads(cli(d, "cancel", out1["id"], "--json").stdout)
        assert again["cancelled"] == [] and again["deliveries"][0]["state"] == "cancelled"

        # The destination is repaired by a reload; the other parked delivery is retried now.
        cfg["destinations"]["outbox"]["path"] = str(tmp_path / "outbox")
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in d.log(), what="reload")
        assert cli(d, "retry", out2["id"]).returncode == 0
        wait_for(lambda: (tmp_path / "outbox" / "two.txt").exists(), what="two.txt delivered")

        def state_of(delivery_id: str) -> str:
            doc = json.loads(cli(d, "show", delivery_id, "--json").stdout)
            return str(doc["delivery"]["state"])

        wait_for(lambda: state_of(out2["id"]) == "delivered", what="delivered")
        # The scheduler has run with a working destination: the cancelled one stays untouched.
        assert state_of(out1["id"]) == "cancelled"
        assert not (tmp_path / "outbox" / "one.txt").exists()
        assert "cancelled" in json.loads(cli(d, "status", "--json").stdout)["deliveries"]

        # retry undoes a cancel.
        assert cli(d, "retry", out1["id"]).returncode == 0
        wait_for(lambda: (tmp_path / "outbox" / "one.txt").exists(), what="one.txt delivered after retry")

        r = cli(d, "cancel", "01NOSUCHID0000000000000000")
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == "relayd: no transfer or delivery with id 01NOSUCHID0000000000000000\n"
        assert d.stop() == 0
