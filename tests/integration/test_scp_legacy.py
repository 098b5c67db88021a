"""Legacy SCP protocol (OpenSSH < 9.0 clients, ``scp -O``): same rules, commit only when complete."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import Daemon, Key, make_file, sha256_file, ssh_opts, wait_for


def scp_legacy(d: Daemon, key: Key, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scp", "-O", *ssh_opts(d, key), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("size", [0, 1, 10 * 1024 * 1024])
def test_scp_o_upload_commits(daemon: Daemon, keys: dict[str, Key], tmp_path: Path, size: int) -> None:
    src = make_file(tmp_path / "src.bin", size, seed=size + 7)
    r = scp_legacy(daemon, keys["acme"], str(src), "acme-erp@127.0.0.1:/legacy.bin")
    assert r.returncode == 0, r.stderr
    rows = [t for t in daemon.transfers() if t["path"] == "/legacy.bin"]
    assert len(rows) == 1 and rows[0]["size"] == size and rows[0]["sha256"] == sha256_file(src)
    assert sha256_file(daemon.inbox("acme") / "legacy.bin") == sha256_file(src)


def test_scp_o_download_and_permissions(daemon: Daemon, keys: dict[str, Key], tmp_path: Path) -> None:
    src = make_file(tmp_path / "src.bin", 300_000)
    assert scp_legacy(daemon, keys["acme"], str(src), "acme-erp@127.0.0.1:/d.bin").returncode == 0
    out = tmp_path / "back.bin"
    r = scp_legacy(daemon, keys["acme"], "-p", "acme-erp@127.0.0.1:/d.bin", str(out))
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)
    # acme-drop has the default drop-box permissions: no download.
    r = scp_legacy(daemon, keys["acme2"], "acme-drop@127.0.0.1:/d.bin", str(tmp_path / "no.bin"))
    assert r.returncode != 0 and not (tmp_path / "no.bin").exists()
    # Paths stay inside the tenant root; the other tenant's files are unreachable.
    r = scp_legacy(daemon, keys["globex"], "globex-1@127.0.0.1:../acme/inbox/d.bin", str(tmp_path / "x.bin"))
    assert r.returncode != 0 and not (tmp_path / "x.bin").exists()
    assert str(daemon.spool) not in r.stderr


def test_scp_o_cut_short_commits_nothing(daemon: Daemon, keys: dict[str, Key], tmp_path: Path) -> None:
    src = make_file(tmp_path / "big.bin", 40 * 1024 * 1024)
    incoming = daemon.spool / "acme" / "incoming"
    proc = subprocess.Popen(["scp", "-O", "-l", "40000", *ssh_opts(daemon, keys["acme"]), str(src),
                             "acme-erp@127.0.0.1:/cut.bin"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(p.stat().st_size > 1024 * 1024 for p in incoming.iterdir()), 60,
                 what="scp upload in progress")
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not any(incoming.iterdir()), 20, what="partial scp upload removed")
    assert not (daemon.inbox("acme") / "cut.bin").exists()
    assert [t for t in daemon.transfers() if t["path"] == "/cut.bin"] == []
