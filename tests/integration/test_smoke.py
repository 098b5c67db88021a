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
