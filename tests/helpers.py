"""Test harness: real relayd processes, real keys, real OpenSSH clients.

Nothing here mocks an edge: the daemon runs as a subprocess (so kill -9 is real), clients are
OpenSSH's ``sftp``/``scp``, paramiko, asyncssh, rclone, lftp and curl.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_or_kill(proc: "subprocess.Popen[Any]", timeout: float) -> int:
    """Wait for ``proc`` to exit; SIGKILL it after ``timeout`` seconds. Returns its exit code."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: Path) -> str:
    """Streamed SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes (deterministic per seed), written in chunks."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path


@dataclass
class Key:
    """An OpenSSH key pair on disk."""

    path: Path

    @property
    def pub(self) -> str:
        return Path(str(self.path) + ".pub").read_text().strip()


def make_key(directory: Path, name: str, kind: str = "ed25519") -> Key:
    """Generate a key with ssh-keygen (no passphrase)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True)
    return Key(path)


@dataclass
class Daemon:
    """A running ``relayd serve`` subprocess."""

    config_path: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    config: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return wait_or_kill(self.proc, timeout)

    def transfers(self, *extra: str) -> list[dict[str, Any]]:
        out = relayd("transfers", "-c", str(self.config_path), "--json", *extra, check=True)
        return json.loads(out.stdout)

    @property
    def spool(self) -> Path:
        return Path(self.config["node"]["spool_dir"])

    def inbox(self, tenant: str) -> Path:
        return self.spool / tenant / "inbox"

    def sftp(self, key: Key, user: str, commands: str, *opts: str, cwd: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run OpenSSH ``sftp -b -`` with ``commands`` on stdin."""
        return subprocess.run(
            ["sftp", "-b", "-", *ssh_opts(self, key), *opts, f"{user}@127.0.0.1"],
            input=commands, text=True, capture_output=True, timeout=timeout, cwd=cwd)


def ssh_opts(d: Daemon, key: Key | None, port_flag: str = "-P") -> list[str]:
    """OpenSSH client options for a test daemon (``port_flag`` is ``-p`` for ssh)."""
    opts = [port_flag, str(d.port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10"]
    if key is not None:
        opts += ["-i", str(key.path), "-o", "IdentitiesOnly=yes"]
    return opts


def relayd(*args: str, check: bool = False, timeout: float = 60,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``relayd`` CLI as a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "relayd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"relayd {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def base_config(workdir: Path, port: int, tenants: dict[str, Any], **gateway: Any) -> dict[str, Any]:
    """A minimal valid config dict rooted in ``workdir``."""
    return {
        "node": {"id": "gw-test", "state_dir": str(workdir / "state"), "spool_dir": str(workdir / "spool")},
        "gateway": {"listen": [f"127.0.0.1:{port}"], **gateway},
        "tenants": tenants,
        "destinations": {},
        "metrics": {"enabled": False},  # tests that scrape set metrics.listen to a free port
    }


def start_daemon(workdir: Path, config: dict[str, Any], port: int | None = None,
                 env: dict[str, str] | None = None, serve_args: tuple[str, ...] = ()) -> Daemon:
    """Write ``config`` and start ``relayd serve`` (plus ``serve_args``); return once it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = int(config["gateway"]["listen"][0].rsplit(":", 1)[1])
    config_path = workdir / "relayd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / f"relayd-{time.monotonic_ns()}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "relayd.cli", "serve", "-c", str(config_path),
                             "--log-level", "debug", *serve_args],
                            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, **(env or {})})
    log_file.close()
    d = Daemon(config_path=config_path, port=port, proc=proc, log_path=log_path, workdir=workdir,
               config=config)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"relayd exited with {proc.returncode}:\n{d.log()}")
        return "relayd ready" in d.log()

    wait_for(ready, 30, what="relayd ready")
    return d


@contextlib.contextmanager
def run_daemon(workdir: Path, config: dict[str, Any], **kw: Any) -> Iterator[Daemon]:
    """Context manager around :func:`start_daemon` that always stops the process."""
    d = start_daemon(workdir, config, **kw)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def paramiko_client(d: Daemon, user: str, key: Key | None = None, password: str | None = None) -> Any:
    """A connected paramiko SFTPClient (TCP_NODELAY set, as users should)."""
    import paramiko

    sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = paramiko.Transport(sock)
    t.start_client(timeout=10)
    if key is not None:
        t.auth_publickey(user, paramiko.Ed25519Key.from_private_key_file(str(key.path))
                         if "ed25519" in key.pub.split()[0] else paramiko.PKey.from_path(str(key.path)))
    else:
        t.auth_password(user, password or "")
    return paramiko.SFTPClient.from_transport(t)


@contextlib.contextmanager
def paramiko_session(d: Daemon, user: str, key: Key | None = None,
                     password: str | None = None) -> Iterator[Any]:
    """:func:`paramiko_client` as a context manager that always closes the transport."""
    client = paramiko_client(d, user, key=key, password=password)
    try:
        yield client
    finally:
        client.get_channel().get_transport().close()


def ssh(d: Daemon, key: Key | None, user: str, *args: str, input: str = "",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run OpenSSH ``ssh`` against ``d``: ``args`` are extra options, then an optional ``--`` and
    the remote command (``ssh(d, k, "u", "-T", "--", "echo", "hi")``)."""
    opts, command = list(args), []
    if "--" in opts:
        cut = opts.index("--")
        opts, command = opts[:cut], opts[cut + 1:]
    return subprocess.run(["ssh", *ssh_opts(d, key, port_flag="-p"), *opts, f"{user}@127.0.0.1", *command],
                          input=input, text=True, capture_output=True, timeout=timeout)
