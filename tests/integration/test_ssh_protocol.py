"""SSH transport properties seen by a real OpenSSH client."""

from __future__ import annotations

import subprocess

from tests.helpers import Daemon, Key, ssh_opts


def test_strict_kex_against_terrapin(daemon: Daemon, keys: dict[str, Key]) -> None:
    """relayd offers kex-strict-s-v00@openssh.com and OpenSSH switches to strict KEX ordering."""
    r = subprocess.run(["sftp", "-vvv", "-b", "-", *ssh_opts(daemon, keys["acme"]), "-o", "LogLevel=DEBUG3",
                        "acme-erp@127.0.0.1"], input="ls\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "kex-strict-s-v00@openssh.com" in r.stderr
    assert "will use strict KEX ordering" in r.stderr
    # The server's kex offer has no SHA-1 and starts with the post-quantum hybrid.
    server_kex = [line for line in r.stderr.splitlines() if "KEX algorithms:" in line][1]
    assert "sha1" not in server_kex
    assert server_kex.split("KEX algorithms: ")[1].startswith("mlkem768x25519-sha256")
