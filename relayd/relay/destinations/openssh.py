"""Bulk uploads through the OpenSSH ``sftp`` client, for large files on ``sftp`` destinations.

asyncssh moves data through Python for every 32 KiB SSH packet (framing, encryption calls,
copies): about 3.5 CPU-seconds per GiB here, where OpenSSH's client does the same in C at
several times the rate. For a large file relayd therefore hands the data path to ``sftp``, the
way rsync hands its transport to ``ssh``: the client reads the spool object itself and writes
the temp file with its own pipelined requests, so no byte of it passes through Python. Everything
else (directories, resume look-ups, the remote SHA-256, the final rename) stays on the pooled
asyncssh connection.

Trust is exactly the asyncssh path's: ``-F /dev/null`` (no user ssh config), the destination's
``identity`` only (``IdentitiesOnly``, no agent), its ``known_hosts`` only with
``StrictHostKeyChecking=yes`` (a changed or unknown host key fails, never TOFU), batch mode (no
prompts), SHA-1 MACs and ``umac-64`` removed from OpenSSH's defaults, ``ssh-rsa`` never enabled.

A resumed upload (``offset > 0``) uses ``reput`` (append from the temp file's current size, which
:func:`~relayd.relay.destinations.base.publish` just measured); a fresh one ``put``. Paths that
would need quoting beyond plain double quotes (quotes, backslashes, newlines, glob characters)
are left to the asyncssh uploader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from relayd.relay.destinations.base import DestinationError

__all__ = ["OpenSSHBulk", "find_sftp_client"]

log = logging.getLogger("relayd.relay.destinations.openssh")

_UNSAFE = re.compile(r'["\\\n\r*?\[\]]')
_STDERR_KEEP = 4096
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes128-ctr", "aes192-ctr", "aes256-ctr")
"""relayd's cipher order (AES-GCM first: AES-NI makes it the fastest), all known to OpenSSH >= 6.5."""


def find_sftp_client() -> str | None:
    """Path of the OpenSSH ``sftp`` client, or None if it is not installed."""
    return shutil.which("sftp")


@dataclass(eq=False)
class OpenSSHBulk:
    """Runs ``sftp -b -`` for one upload at a time; at most ``limit`` at once (the others wait)."""

    program: str
    host: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    connect_timeout: float
    block_size: int
    requests: int
    name: str
    """The destination's name, for log lines."""
    limit: int = 4
    """Clients that may run at once (the destination's ``concurrency``): each is a connection of
    its own, and a partner's sshd drops new connections beyond its ``MaxStartups``."""
    uploads: int = field(default=0, init=False)
    """Uploads run so far (for tests and metrics)."""
    active: int = field(default=0, init=False)
    """Clients running now."""
    peak: int = field(default=0, init=False)
    """Most clients that ran at once (for tests)."""
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    wrap: bool = field(default=True, init=False)
    """Use the setpriv wrapper (turned off after it was killed by a system call filter)."""

    @staticmethod
    def usable(local: Path, remote: str) -> bool:
        """Whether both paths can go into a batch command as plain double-quoted words."""
        return not (_UNSAFE.search(str(local)) or _UNSAFE.search(remote))

    def command(self) -> list[str]:
        """The ``sftp`` command line (the batch comes on stdin).

        Wrapped in ``setpriv --pdeathsig KILL`` where that works, so a client never outlives a
        relayd that was killed (it would race the resumed attempt). Under a system call filter that
        forbids ``capset`` (the systemd unit's ``~@privileged``) setpriv is killed with SIGSYS:
        relayd then runs the client bare from then on, and systemd's cgroup cleanup does the job.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        setpriv = shutil.which("setpriv") if self.wrap else None
        return [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            self.program, "-b", "-", "-F", "/dev/null", "-P", str(self.port), "-i", str(self.identity),
            "-B", str(self.block_size), "-R", str(self.requests),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "PreferredAuthentications=publickey", "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no",
            "-o", f"Ciphers={','.join(_CIPHERS)}", "-o", "MACs=-*sha1*,umac-64*", "-o", f"ConnectTimeout={max(1, int(self.connect_timeout))}",
            "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
            "--", f"{self.user}@{host}",
        ]

    async def upload(self, local: Path, remote: str, offset: int, size: int) -> int:
        """Write ``local[offset:size]`` to ``remote`` (which holds exactly ``offset`` bytes when
        ``offset > 0``); return the bytes sent. DestinationError (retryable) on failure."""
        # The spool object is read-only (0444) and put copies the local mode: make the temp file
        # 0644 like the asyncssh path does, before a resume too (a 0444 file cannot be appended to).
        chmod = f'chmod 644 "{remote}"\n'
        verb = "reput" if offset else "put"
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.limit))
        async with self._slots:
            self.uploads += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await self._run_batch((chmod if offset else "") + f'{verb} "{local}" "{remote}"\n' + chmod)
            finally:
                self.active -= 1
        return size - offset

    async def _run_batch(self, batch: str) -> None:
        wrapped = self.wrap and shutil.which("setpriv") is not None
        returncode, err = await self._run_once(batch)
        if wrapped and returncode == -signal.SIGSYS:
            log.info("dest=%s setpriv is not allowed here (system call filter); running sftp without it",
                     self.name)
            self.wrap = False
            returncode, err = await self._run_once(batch)
        if returncode != 0:
            text = err[-_STDERR_KEEP:].decode("utf-8", "replace").strip()
            last = text.splitlines()[-1] if text else f"exit status {returncode}"
            if "host key verification failed" in text.lower() or "REMOTE HOST IDENTIFICATION" in text:
                log.error("ALERT dest=%s host key mismatch for %s:%d seen by the OpenSSH client: not the one "
                          "pinned in %s; refusing to send", self.name, self.host, self.port, self.known_hosts)
                raise DestinationError(f"host key mismatch for {self.host}:{self.port}: not pinned in known_hosts",
                                       retryable=True)
            raise DestinationError(f"OpenSSH sftp upload to {self.host}:{self.port} failed: {last[:300]}",
                                   retryable=True)

    async def _run_once(self, batch: str) -> tuple[int | None, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=_environment())
        try:
            _, err = await proc.communicate(batch.encode())
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        return proc.returncode, err


def _environment() -> dict[str, str]:
    """A small environment for the client: no agent, no display, a C locale."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "USER", "LOGNAME", "TMPDIR")}
    keep.setdefault("PATH", "/usr/bin:/bin")
    keep["LC_ALL"] = "C"
    return keep
