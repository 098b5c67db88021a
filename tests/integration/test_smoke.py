"""End-to-end smoke: OpenSSH sftp uploads land in the journal with the right digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Daemon, Key, make_file, sha256_file


@pytest.mark.parametrize("size", [0, 1, 10 * 1024 * 1024])
def test_sftp_upload_commits_with_digest(daemon: Daemon, keys: dict[str, Key], tmp_path: Path, size: int) -> None:
    src = make_file(tmp_path / f"f{size}.bin", size, seed=size)
    r = daemon.sftp(keys["acme"], "acme-erp", f"put {src} /f.bin\n")
    assert r.returncode == 0, r.stderr
    rows = daemon.transfers()
    assert len(rows) == 1
    assert rows[0]["path"] == "/f.bin"
    assert rows[0]["size"] == size
    assert rows[0]["sha256"] == sha256_file(src)
    assert sha256_file(daemon.inbox("acme") / "f.bin") == sha256_file(src)


def test_routes_fan_out_deliveries_at_commit(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Each matching route's destinations get one pending delivery; a file matching none is unrouted."""
    from tests.conftest import two_tenants
    from tests.helpers import base_config, free_port, relayd, run_daemon

    port = free_port()
    tenants = two_tenants(keys, routes=[{"match": "in/**", "to": ["archive", "partner"]},
                                        {"match": "**/*.csv", "to": ["archive"]}])
    cfg = base_config(tmp_path, port, tenants)
    cfg["destinations"] = {"archive": {"type": "local", "path": str(tmp_path / "archive/{tenant}")},
                           "partner": {"type": "local", "path": str(tmp_path / "partner")}}
    with run_daemon(tmp_path / "d", cfg) as d:
        src = make_file(tmp_path / "x.csv", 10)
        r = d.sftp(keys["acme"], "acme-erp", f"mkdir /in\nput {src} /in/x.csv\nput {src} /top.bin\nput {src} /a.csv\n")
        assert r.returncode == 0, r.stderr
        by_path = {t["path"]: t for t in d.transfers()}
        assert [x["destination"] for x in by_path["/in/x.csv"]["deliveries"]] == ["archive", "partner"]
        assert {x["state"] for x in by_path["/in/x.csv"]["deliveries"]} <= {"pending", "sending", "delivered"}
        assert [x["destination"] for x in by_path["/a.csv"]["deliveries"]] == ["archive"]
        assert by_path["/top.bin"]["unrouted"] is True and by_path["/top.bin"]["state"] == "committed"
        table = relayd("transfers", "-c", str(d.config_path), check=True).stdout
        assert "unrouted" in table and "archive:" in table
