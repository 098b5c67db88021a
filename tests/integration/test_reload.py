"""SIGHUP reloads the config; a broken config is rejected and the old one kept."""

from __future__ import annotations

import signal
from pathlib import Path

import yaml

from tests.conftest import two_tenants
from tests.helpers import Key, base_config, free_port, make_key, run_daemon, wait_for


def test_reload_adds_user_and_rejects_broken_config(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys))
    newkey = make_key(tmp_path / "k", "newbie")
    with run_daemon(tmp_path, cfg) as d:
        assert d.sftp(newkey, "newbie", "ls\n").returncode != 0
        cfg["tenants"]["globex"]["users"].append({"name": "newbie", "authorized_keys": [newkey.pub]})
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in d.log(), what="reload")
        r = d.sftp(newkey, "newbie", "ls\n")
        assert r.returncode == 0, r.stderr

        d.config_path.write_text("node: {id: gw-test\n  broken: [")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in d.log(), what="rejected reload")
        assert d.proc.poll() is None
        assert d.sftp(newkey, "newbie", "ls\n").returncode == 0  # old (valid) config still in force
        assert d.stop() == 0
