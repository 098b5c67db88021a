"""SIGHUP while work is in progress: open sessions keep going to completion under the config they
started with; new sessions and the relay take the new one (users, limits, routes, destinations)."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import two_tenants
from tests.helpers import Daemon, Key, base_config, free_port, make_file, paramiko_session, run_daemon, wait_for


def reload(d: Daemon, cfg: dict[str, Any]) -> None:
    d.config_path.write_text(yaml.safe_dump(cfg))
    count = d.log().count("config reloaded")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log().count("config reloaded") > count, what="reload")


def delivered(d: Daemon, path: str) -> dict[str, str]:
    t = [x for x in d.transfers() if x["path"] == path]
    return {x["destination"]: x["state"] for x in t[-1]["deliveries"]} if t else {}


def test_upload_across_reload_completes_and_new_routes_apply(tmp_path: Path, keys: dict[str, Key]) -> None:
    a, a2, b = tmp_path / "a", tmp_path / "a2", tmp_path / "b"
    cfg = base_config(tmp_path, free_port(), two_tenants(keys, routes=[{"match": "**", "to": ["a"]}]))
    cfg["destinations"] = {"a": {"type": "local", "path": str(a)}}
    with run_daemon(tmp_path, cfg) as d:
        r = d.sftp(keys["acme"], "acme-erp", "put /etc/hostname before.txt\n")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: delivered(d, "/before.txt") == {"a": "delivered"}, what="first delivery")

        first, rest = os.urandom(700_000), os.urandom(800_000)
        with paramiko_session(d, "acme-erp", key=keys["acme"]) as sftp:
            f = sftp.open("/big.bin", "wb")
            f.write(first)
            # The new config: acme-erp is gone, files are smaller than 1 MB, destination a moved
            # and a new destination b gets everything too.
            new = copy.deepcopy(cfg)
            new["tenants"]["acme"]["users"] = [u for u in new["tenants"]["acme"]["users"] if u["name"] != "acme-erp"]
            new["tenants"]["acme"]["max_file_size"] = "1MB"
            new["tenants"]["acme"]["routes"] = [{"match": "**", "to": ["a", "b"]}]
            new["destinations"] = {"a": {"type": "local", "path": str(a2)}, "b": {"type": "local", "path": str(b)}}
            reload(d, new)
            # The open session keeps working, under the config it started with, to completion.
            f.write(rest)
            f.close()
            assert sftp.stat("/big.bin").st_size == 1_500_000
            assert "/" in sftp.normalize(".")
        # New sessions see the new config: the removed user cannot log in, the limit applies.
        assert d.sftp(keys["acme"], "acme-erp", "ls\n").returncode != 0
        too_big = make_file(tmp_path / "too-big.bin", 1_200_000)
        r = d.sftp(keys["acme2"], "acme-drop", f"put {too_big} too-big.bin\n")
        assert r.returncode != 0
        r = d.sftp(keys["acme2"], "acme-drop", "put /etc/hostname after.txt\n")
        assert r.returncode == 0, r.stderr

        # The relay uses the new routes and destinations from the next commit on: the upload
        # that was in progress during the reload is such a commit.
        for path in ("/big.bin", "/after.txt"):
            wait_for(lambda: delivered(d, path) == {"a": "delivered", "b": "delivered"}, what=f"{path} delivered")
        assert (a2 / "big.bin").read_bytes() == first + rest
        assert (b / "big.bin").stat().st_size == 1_500_000 and (b / "after.txt").exists()
        assert not (a / "big.bin").exists() and not (a / "after.txt").exists()
        assert (a / "before.txt").exists() and not (b / "before.txt").exists()  # no redelivery of old ones
        assert d.stop() == 0


def test_rejected_reload_keeps_routes_and_open_sessions(tmp_path: Path, keys: dict[str, Key]) -> None:
    cfg = base_config(tmp_path, free_port(), two_tenants(keys, routes=[{"match": "**", "to": ["a"]}]))
    cfg["destinations"] = {"a": {"type": "local", "path": str(tmp_path / "a")}}
    with run_daemon(tmp_path, cfg) as d:
        with paramiko_session(d, "acme-erp", key=keys["acme"]) as sftp:
            f = sftp.open("/x.bin", "wb")
            f.write(b"1" * 1000)
            bad = copy.deepcopy(cfg)
            bad["tenants"]["acme"]["routes"] = [{"match": "**", "to": ["missing"]}]
            d.config_path.write_text(yaml.safe_dump(bad))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload rejected" in d.log(), what="rejected reload")
            assert "tenants.acme.routes[0].to[0]: unknown destination 'missing'" in d.log()
            d.config_path.write_text(yaml.safe_dump(cfg))  # for the CLI below; the daemon is not told
            f.write(b"2" * 1000)
            f.close()
        wait_for(lambda: delivered(d, "/x.bin") == {"a": "delivered"}, what="delivered with the old routes")
        assert (tmp_path / "a" / "x.bin").stat().st_size == 2000
        assert d.stop() == 0


def test_reload_warns_about_restart_only_keys(tmp_path: Path, keys: dict[str, Key]) -> None:
    cfg = base_config(tmp_path, free_port(), two_tenants(keys))
    with run_daemon(tmp_path, cfg) as d:
        new = copy.deepcopy(cfg)
        new["gateway"]["listen"] = [f"127.0.0.1:{free_port()}"]
        new["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
        reload(d, new)
        log = d.log()
        assert "node and gateway.listen changes need a restart" in log
        assert "metrics changes need a restart" in log
        assert d.sftp(keys["acme"], "acme-erp", "ls\n").returncode == 0  # still on the old port
        assert d.stop() == 0
