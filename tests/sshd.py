"""A throwaway OpenSSH ``sshd`` for tests and benchmarks.

:func:`throwaway_sshd` starts a private ``/usr/sbin/sshd -D -e`` with its own config, host key,
authorized_keys and pid file, all inside ``workdir``, listening on a high port on 127.0.0.1.
It never reads or touches the system sshd's config, keys or port 22.

Typical use (tests, or as a fake remote SFTP "cloud")::

    with throwaway_sshd(tmp_path / "sshd", authorized_keys=[key.pub]) as srv:
        subprocess.run(["sftp", "-b", "-", *srv.client_opts(key.path), srv.target()],
                       input=f"put {src} {tmp_path}/dst.bin\\n", text=True, check=True)

The login user is the current user (``getpass.getuser()``); as root, ``PermitRootLogin
prohibit-password`` allows key logins. Without ``chroot`` the SFTP session starts in the user's
home directory, so pass absolute paths. With ``chroot`` (root only) every component of the path
must be owned by root and not group/world writable (sshd's own rule), so a directory under
``/tmp`` cannot be used: sshd would refuse the login. :func:`throwaway_sshd` checks this up front.

Only the standard library is used, so scripts (``scripts/bench``) can import this module too.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port, wait_or_kill
from typing import Iterator

__all__ = ["SSHD", "ThrowawaySshd", "SshdError", "throwaway_sshd", "free_port"]

SSHD = "/usr/sbin/sshd"


class SshdError(RuntimeError):
    """The throwaway sshd could not be configured or did not come up."""


def _descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid`` (from ``/proc/*/stat``), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _check_chroot(chroot: Path) -> None:
    """Raise :class:`SshdError` if sshd would refuse ``chroot`` (it checks every path component)."""
    if os.geteuid() != 0:
        raise SshdError("ChrootDirectory needs sshd to run as root")
    path = chroot.resolve()
    if not path.is_dir():
        raise SshdError(f"chroot {path} is not a directory")
    for component in [path, *path.parents]:
        st = component.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise SshdError(f"sshd refuses chroot {path}: component {component} must be owned by root "
                            "and not group/world writable (use a directory outside /tmp)")


@dataclass
class ThrowawaySshd:
    """A running throwaway sshd (what :func:`throwaway_sshd` yields)."""

    workdir: Path
    host: str
    port: int
    user: str
    host_key_pub: str
    """The host public key line (``ssh-ed25519 AAAA... comment``), for known_hosts pinning."""
    config_path: Path
    log_path: Path
    known_hosts_path: Path
    """A known_hosts file in ``workdir`` holding :meth:`known_hosts_line`."""
    proc: subprocess.Popen[bytes]

    def known_hosts_line(self) -> str:
        """``[127.0.0.1]:PORT ssh-ed25519 AAAA...``: pins this server's host key."""
        kind, blob = self.host_key_pub.split()[:2]
        return f"[{self.host}]:{self.port} {kind} {blob}"

    def target(self) -> str:
        """``user@host`` for ssh/sftp/scp command lines."""
        return f"{self.user}@{self.host}"

    def client_opts(self, identity: Path | str | None = None, port_flag: str = "-P") -> list[str]:
        """OpenSSH client options: port, strict pinning against :attr:`known_hosts_path`, batch mode.

        ``port_flag`` is ``-P`` for sftp/scp and ``-p`` for ssh.
        """
        opts = [port_flag, str(self.port), "-o", f"UserKnownHostsFile={self.known_hosts_path}",
                "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
        if identity is not None:
            opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        return opts

    def session_pids(self) -> list[int]:
        """Pids of the session processes sshd forked that are still alive (empty when idle)."""
        return _descendants(self.proc.pid) if self.proc.poll() is None else []

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait (deadline-based) until every session process has exited and been reaped.

        After this, sshd's ``cutime``/``cstime`` in ``/proc/PID/stat`` include the sessions' CPU.
        """
        deadline = time.monotonic() + timeout
        while self.session_pids():
            if time.monotonic() > deadline:
                raise SshdError(f"sshd sessions still running after {timeout}s: {self.session_pids()}")
            time.sleep(0.01)

    def log(self) -> str:
        """What sshd wrote to stderr so far (``-e``)."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate sshd and any session processes it forked; return sshd's exit code.

        sshd's session children call ``setsid()``, so a process-group kill would miss them: they
        are collected from ``/proc`` before the listener is stopped. Idempotent.
        """
        if self.proc.poll() is None:
            kids = _descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            for pid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        return wait_or_kill(self.proc, timeout)


def _write_config(workdir: Path, *, port: int, host: str, user: str, host_key: Path, sftp: str,
                  chroot: Path | None, log_level: str = "INFO") -> Path:
    lines = [
        "# throwaway sshd written by tests/sshd.py; everything lives in this folder",
        f"ListenAddress {host}:{port}",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        "StrictModes no",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "MaxStartups 100:30:200",
        f"LogLevel {log_level}",
        # Like a plain remote account: Debian's bash sources ~/.bashrc for commands run by sshd
        # when SHLVL is unset, and on a dev box that file may be slow (pyenv init: ~150 ms per
        # command), which every exec (relayd's remote sha256sum) would pay.
        "SetEnv SHLVL=1",
        f"Subsystem sftp {sftp}",
    ]
    if chroot is not None:
        lines += [f"ChrootDirectory {chroot.resolve()}", "ForceCommand internal-sftp"]
    path = workdir / "sshd_config"
    path.write_text("\n".join(lines) + "\n")
    return path


def _banner(host: str, port: int) -> bytes:
    """The first line the server sends, or ``b""`` if it does not accept connections (yet)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.settimeout(1.0)
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def _start(workdir: Path, config: Path, host: str, port: int, timeout: float) -> subprocess.Popen[bytes]:
    """Start sshd and wait (deadline-based) for an ``SSH-2.0`` banner on ``host:port``."""
    log_path = workdir / "sshd.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SshdError(f"sshd exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        if _banner(host, port).startswith(b"SSH-2.0-"):
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SshdError(f"sshd did not answer on {host}:{port} within {timeout}s:\n"
                            f"{log_path.read_text(errors='replace')}")
        time.sleep(0.02)


@contextlib.contextmanager
def throwaway_sshd(workdir: Path, *, authorized_keys: list[str], sftp: str = "internal-sftp",
                   chroot: Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                   timeout: float = 15.0, log_level: str = "INFO") -> Iterator[ThrowawaySshd]:
    """Run a private OpenSSH sshd for the duration of the ``with`` block.

    ``authorized_keys`` are public key lines for the current user; ``sftp`` is the ``Subsystem
    sftp`` command (``internal-sftp`` or a path such as ``/usr/lib/openssh/sftp-server``);
    ``chroot`` sets ``ChrootDirectory`` (+ ``ForceCommand internal-sftp``); ``port`` defaults to a
    free high port (retried if another process grabs it first); ``log_level`` is sshd's ``LogLevel``
    (``VERBOSE`` plus ``internal-sftp -l VERBOSE`` logs each SFTP request). sshd is stopped on exit.
    """
    if not os.access(SSHD, os.X_OK):
        raise SshdError(f"{SSHD} not found (apt-get install openssh-server)")
    if chroot is not None:
        _check_chroot(chroot)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # Privilege separation directory; Debian's sshd refuses to start without it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    user = getpass.getuser()
    host_key = workdir / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"throwaway-sshd@{host}",
                        "-f", str(host_key)], check=True)
    host_key_pub = Path(str(host_key) + ".pub").read_text().strip()
    (workdir / "authorized_keys").write_text("".join(k.strip() + "\n" for k in authorized_keys))

    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        config = _write_config(workdir, port=chosen, host=host, user=user, host_key=host_key, sftp=sftp,
                               chroot=chroot, log_level=log_level)
        try:
            proc = _start(workdir, config, host, chosen, timeout)
            break
        except SshdError:
            if attempt + 1 == attempts:
                raise
    server = ThrowawaySshd(workdir=workdir, host=host, port=chosen, user=user, host_key_pub=host_key_pub,
                           config_path=config, log_path=workdir / "sshd.log",
                           known_hosts_path=workdir / "known_hosts", proc=proc)
    server.known_hosts_path.write_text(server.known_hosts_line() + "\n")
    try:
        yield server
    finally:
        server.stop()
