"""The throwaway OpenSSH sshd helper (tests/sshd.py) really serves SFTP with a pinned host key."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.helpers import Key, make_file, make_key, sha256_file
from tests.sshd import throwaway_sshd


def test_openssh_sftp_upload_to_throwaway_sshd(tmp_path: Path) -> None:
    key: Key = make_key(tmp_path / "keys", "user")
    src = make_file(tmp_path / "src.bin", 3 * 1024 * 1024 + 7, seed=1)
    dst = tmp_path / "dst"
    dst.mkdir()
    with throwaway_sshd(tmp_path / "sshd", authorized_keys=[key.pub]) as srv:
        assert srv.port != 22
        assert srv.known_hosts_line().startswith(f"[127.0.0.1]:{srv.port} ssh-ed25519 ")
        r = subprocess.run(["sftp", "-b", "-", *srv.client_opts(key.path), srv.target()],
                           input=f"put {src} {dst}/up.bin\nls -l {dst}\n", text=True,
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr + srv.log()
        assert sha256_file(dst / "up.bin") == sha256_file(src)
        proc = srv.proc
    # Leaving the block stops sshd and frees the port.
    assert proc.poll() is not None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", srv.port)) != 0


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    good = make_key(tmp_path / "keys", "good")
    bad = make_key(tmp_path / "keys", "bad")
    with throwaway_sshd(tmp_path / "sshd", authorized_keys=[good.pub]) as srv:
        r = subprocess.run(["sftp", "-b", "-", *srv.client_opts(bad.path), srv.target()],
                           input="ls\n", text=True, capture_output=True, timeout=60)
        assert r.returncode != 0
        assert "Permission denied" in r.stderr
