"""``relayd init-demo``: a self-contained demo setup (config, keys, known_hosts) in one folder."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import asyncssh

__all__ = ["init_demo", "sftp_command"]

_CONFIG = """\
# relayd demo config, written by `relayd init-demo`. Everything lives under this folder.
node:
  id: demo-gw
  state_dir: state
  spool_dir: spool
gateway:
  listen: ["127.0.0.1:{port}"]
tenants:
  demo:
    quota: {{bytes: 1GiB, files: 10000}}
    max_file_size: 512MiB
    commit: close
    users:
      - name: demo
        authorized_keys_file: keys/demo_ed25519.pub
        permissions: [upload, list, mkdir, download, overwrite, rename, delete]
    routes:
      - {{match: "**", to: [archive]}}
destinations:
  archive:
    type: local
    path: archive/{{tenant}}
"""


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def sftp_command(demo_dir: Path, port: int) -> str:
    """The exact OpenSSH ``sftp`` command line that uploads a file into the demo."""
    d = demo_dir
    return (f"echo 'put README.md' | sftp -b - -P {port} -i {shlex.quote(str(d / 'keys/demo_ed25519'))} "
            f"-o IdentitiesOnly=yes -o UserKnownHostsFile={shlex.quote(str(d / 'known_hosts'))} demo@127.0.0.1")


def init_demo(demo_dir: Path, port: int = 2222, force: bool = False) -> Path:
    """Write ``relayd.yaml``, a user key, a host key and known_hosts under ``demo_dir``."""
    cfg = demo_dir / "relayd.yaml"
    if cfg.exists() and not force:
        return cfg
    for sub in ("keys", "state", "spool", "archive"):
        (demo_dir / sub).mkdir(parents=True, exist_ok=True)
    user_key = asyncssh.generate_private_key("ssh-ed25519", comment="demo@relayd")
    _write(demo_dir / "keys/demo_ed25519", user_key.export_private_key(), 0o600)
    _write(demo_dir / "keys/demo_ed25519.pub", user_key.export_public_key(), 0o644)
    host_key_path = demo_dir / "state/ssh_host_ed25519_key"
    host_key = asyncssh.generate_private_key("ssh-ed25519", comment="relayd@demo-gw")
    _write(host_key_path, host_key.export_private_key(), 0o600)
    _write(Path(str(host_key_path) + ".pub"), host_key.export_public_key(), 0o644)
    pub = host_key.export_public_key().decode().split()
    _write(demo_dir / "known_hosts", f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n".encode(), 0o644)
    _write(cfg, _CONFIG.format(port=port).encode(), 0o644)
    return cfg
