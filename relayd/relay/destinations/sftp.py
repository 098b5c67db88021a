"""The ``sftp`` destination: any SFTP server, reached with asyncssh, host key pinned.

* **Host key pinning**: ``known_hosts`` is required and the only source of trust (no ssh config,
  no agent, no trust-on-first-use). An unknown or changed key fails with a retryable
  :class:`DestinationError` and an ERROR log line containing ``ALERT``.
* **Pool**: at most ``concurrency`` connections per destination, each with one SFTP session,
  reused across deliveries and closed after ``idle_timeout`` unused (or on any error).
* **Pipelined writes** from the spool file: blocks of ``block_size`` (capped at 261120, OpenSSH's
  limit, and at the server's advertised limit), ``requests`` in flight; memory stays at about
  ``block_size * requests`` per delivery.
* **Durable before done** (``fsync``, default on): the server flushes each temp file to its disk
  (``fsync@openssh.com``, offered by OpenSSH since 6.5) while relayd verifies it, and the rename
  waits for both, so ``delivered`` means the bytes are on the far end's disk, not in its page
  cache. A server without the extension (or refusing it) is noted on the delivery, like a
  missing remote digest.
* **Verify**: files up to 1 MiB are read back over the SFTP session and hashed here (cheaper than
  a remote process, and possible on servers that refuse exec); larger ones get ``openssl dgst
  -sha256`` (else ``sha256sum``) over an exec channel when the server allows it, batched across
  concurrent deliveries, else size (noted); the command that works is remembered per destination.
* **Bulk data path**: files of ``bulk_min_size`` (16 MiB) and more are written by the OpenSSH
  ``sftp`` client (same pinning and key; see :mod:`relayd.relay.destinations.openssh`), several
  times faster than asyncssh's Python data path; ``bulk_client: asyncssh`` turns that off. Each
  client is a connection of its own: at most ``concurrency`` run at once.
* Modern algorithms only (the gateway's list: no SHA-1, no CBC).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncssh

from relayd.config.model import DestinationConfig
from relayd.config.schema import DEFAULT_ALGORITHMS
from relayd.relay.destinations.base import (DestinationError, DigestUnavailable, Outcome, Payload, Target,
                                            open_spool_object, parse_on_conflict, parse_verify, publish, register)
from relayd.relay.destinations.openssh import OpenSSHBulk, find_sftp_client

log = logging.getLogger("relayd.relay.destinations.sftp")

MAX_BLOCK = 261120
"""OpenSSH's sftp-server refuses larger writes (see shared/notes/asyncssh.md)."""
_DIGEST_RE = re.compile(r"^\\?([0-9a-f]{64})[ *]")
_DIGEST_RATE = 20 * 1024 * 1024
"""Bytes/s assumed for the remote digest command when sizing its timeout (generous)."""


def _openssl_command(paths: list[str]) -> str:
    # openssl has no ``--``: keep a relative name that starts with "-" from reading as an option.
    args = " ".join(shlex.quote(f"./{p}" if p.startswith("-") else p) for p in paths)
    return f"openssl dgst -sha256 -r {args}"  # prints "<hex> *<path>" per file


def _sha256sum_command(paths: list[str]) -> str:
    return "sha256sum -- " + " ".join(shlex.quote(p) for p in paths)  # "<hex>  <path>" per file


_DIGEST_COMMANDS: dict[str, Callable[[list[str]], str]] = {
    "openssl": _openssl_command,
    "sha256sum": _sha256sum_command,
}
"""Remote digest commands, fastest first; the last is the fallback that is always tried."""


class DigestCommands:
    """Per destination: which remote digest command to run, learnt from what worked.

    A command that worked is tried first from then on. One that failed (non-zero exit status or
    no digest in its output) and has never worked on this destination is skipped afterwards, so a
    server without ``openssl`` costs one extra exec once, not per file. The last command of
    :data:`_DIGEST_COMMANDS` is always tried when nothing else is left (as before: one exec per
    file on a server that refuses exec or has neither command).
    """

    def __init__(self) -> None:
        self.working: str | None = None
        self.skipped: set[str] = set()

    def order(self) -> list[str]:
        """Commands to try, in order."""
        names = [n for n in _DIGEST_COMMANDS if n not in self.skipped]
        if self.working in names:
            names.remove(self.working)
            names.insert(0, self.working)
        return names or list(_DIGEST_COMMANDS)[-1:]

    def worked(self, name: str) -> None:
        """``name`` gave a digest."""
        self.working = name
        self.skipped.discard(name)

    def failed(self, name: str) -> None:
        """``name`` gave no digest (not a timeout or a refused exec)."""
        if name != self.working:
            self.skipped.add(name)


@dataclass(eq=False)
class _Conn:
    """One pooled SSH connection and its SFTP session, shared by up to ``streams`` deliveries."""

    ssh: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient | None
    """None for kinds that open their own channels per delivery (relayd peers)."""
    window: asyncio.Semaphore
    """Write requests in flight on this connection, shared by its deliveries (bounds memory)."""
    users: int = 0
    idle_timer: asyncio.TimerHandle | None = None
    retired: bool = False
    """Close instead of reuse once its last delivery ends (set by :meth:`Pool.close`)."""
    dirs: set[str] = field(default_factory=set)
    """Directories this connection created or found (forgotten on any error, so a directory
    removed behind our back costs one retried attempt, not a wrong result)."""
    no_fsync: bool = False
    """The server did not offer or refused fsync@openssh.com on this connection."""


_FAILED_CONNECT_HOLD = 1.0
"""Seconds a failed connect is reported to other deliveries instead of trying again at once."""


class Pool:
    """At most ``limit`` connections, each shared by up to ``streams`` deliveries at once.

    A delivery gets an unused connection if there is one, else a new connection while fewer than
    ``limit`` are open, else the least busy one. A connection with no deliveries closes after
    ``idle_timeout`` seconds. A transport error (lost connection, timeout, cancellation) closes
    the connection; an SFTP status error (permission denied, no such file) keeps it.
    """

    def __init__(self, name: str, connect: Callable[[], Awaitable[_Conn]], limit: int, idle_timeout: float,
                 streams: int = 1) -> None:
        self._name = name
        self._connect = connect
        self._limit = max(1, limit)
        self._streams = max(1, streams)
        self._conns: list[_Conn] = []
        self._connecting = 0
        self._changed = asyncio.Event()
        self._failure: tuple[float, DestinationError] | None = None
        self.idle_timeout = idle_timeout
        self.opened = 0
        """Connections opened so far (for tests and metrics)."""

    @property
    def size(self) -> int:
        """Open connections (idle + in use)."""
        return sum(1 for c in self._conns if not c.ssh.is_closed())

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[_Conn]:
        """A connection for one delivery (see the class docstring for sharing and closing)."""
        conn = await self._take()
        broken = True
        try:
            yield conn
            broken = False
        except (asyncssh.SFTPError, DestinationError):
            conn.dirs.clear()
            broken = False
            raise
        finally:
            conn.users -= 1
            if broken:
                conn.dirs.clear()
                self._drop(conn)
            elif conn.users == 0:
                if conn.retired or conn.ssh.is_closed():
                    self._drop(conn)
                else:
                    loop = asyncio.get_running_loop()
                    conn.idle_timer = loop.call_later(self.idle_timeout, self._expire, conn)
            self._changed.set()

    async def _take(self) -> _Conn:
        while True:
            self._conns = [c for c in self._conns if not c.ssh.is_closed()]
            usable = [c for c in self._conns if not c.retired]
            idle = [c for c in usable if c.users == 0]
            if idle:
                return self._use(idle[-1])
            if len(self._conns) + self._connecting < self._limit:
                failure = self._failure
                if failure is not None and time.monotonic() < failure[0]:
                    raise failure[1]
                self._connecting += 1
                try:
                    conn = await self._connect()
                except DestinationError as e:
                    self._failure = (time.monotonic() + _FAILED_CONNECT_HOLD, e)
                    raise
                finally:
                    self._connecting -= 1
                    self._changed.set()
                self._failure = None
                self.opened += 1
                self._conns.append(conn)
                return self._use(conn)
            shared = [c for c in usable if c.users < self._streams]
            if shared:
                return self._use(min(shared, key=lambda c: c.users))
            self._changed.clear()
            await self._changed.wait()

    @staticmethod
    def _use(conn: _Conn) -> _Conn:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        conn.users += 1
        return conn

    def _drop(self, conn: _Conn) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        if conn in self._conns:
            self._conns.remove(conn)
        conn.ssh.close()

    def _expire(self, conn: _Conn) -> None:
        conn.idle_timer = None
        if conn.users == 0 and conn in self._conns:
            log.debug("dest=%s closing idle connection", self._name)
            self._drop(conn)

    async def close(self) -> None:
        """Close unused connections now; busy ones close when their last delivery ends."""
        idle = [c for c in self._conns if c.users == 0]
        for conn in self._conns:
            conn.retired = True
        for conn in idle:
            self._drop(conn)
        for conn in idle:
            await conn.ssh.wait_closed()
        self._changed.set()


def _batchable(path: str) -> bool:
    """Paths whose digest line can be matched in a multi-file output (no escaping involved)."""
    return "\n" not in path and "\\" not in path and not path.startswith("-")


def _parse_digests(output: str, paths: list[str]) -> dict[str, str]:
    """``path -> hex`` from ``openssl dgst -r`` / ``sha256sum`` output over ``paths``.

    Lines are ``<hex> *<path>`` or ``<hex>  <path>``; a line that does not end in one of the
    requested paths is ignored (its file then gets a digest of its own).
    """
    wanted = set(paths)
    found: dict[str, str] = {}
    for line in output.splitlines():
        if len(line) < 67 or line[64] != " " or line[65] not in " *":
            continue
        digest, name = line[:64], line[66:]
        if name in wanted and _HEX64_RE.match(digest):
            found[name] = digest
    return found


_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
READBACK_MAX = 1024 * 1024
"""Files up to this size are verified by reading them back over SFTP instead of a remote exec."""
BULK_MIN = 16 * 1024 * 1024
"""Default ``bulk_min_size``: files from this size are uploaded by the OpenSSH client."""
BATCH_DIGESTS_FROM = 8
"""Deliveries in flight on a destination from which small files are hashed by batched execs."""
_SOLO_DIGEST = 16 * 1024 * 1024
"""Files larger than this get an exec of their own (hashing them takes long enough that batching
gains nothing, and small files should not queue behind them)."""


@dataclass(eq=False)
class _DigestRequest:
    conn: _Conn
    path: str
    size: int
    future: asyncio.Future[str]


class DigestBatcher:
    """Remote SHA-256 for a destination: requests of concurrent deliveries share one exec.

    Group-commit style: when no exec is running (or fewer than ``parallel``), the pending
    requests go out at once as ``openssl dgst -sha256 -r p1 p2 ...`` (or ``sha256sum -- ...``);
    requests made meanwhile wait for the next exec. A thousand small files thus cost a few dozen
    execs instead of a thousand, and a single large file still gets its exec immediately. The
    exec runs on the connection of the oldest request in the batch; files over 16 MiB get their
    own exec at once. Results are matched by path;
    a file missing from a batch's output (or with a name that needs escaping) gets an exec of
    its own, which reports the precise failure.
    """

    def __init__(self, commands: DigestCommands, base_timeout: float, parallel: int = 2,
                 max_paths: int = 200, max_chars: int = 32768) -> None:
        self.commands = commands
        self.base_timeout = base_timeout
        self.parallel = max(1, parallel)
        self.max_paths = max_paths
        self.max_chars = max_chars
        self._pending: list[_DigestRequest] = []
        self._running = 0
        self.refused = False
        """The server refused an exec channel (small files are then read back instead)."""
        self.execs = 0
        """Exec channels opened so far (for tests and metrics)."""

    async def sha256(self, conn: _Conn, path: str, size: int) -> str:
        """The hex digest of ``path`` on the server; DigestUnavailable if it cannot be had."""
        if size > _SOLO_DIGEST or not _batchable(path):
            return await self._single(conn, path, size)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append(_DigestRequest(conn, path, size, future))
        if self._running < self.parallel:
            self._launch()
        return await future

    def _launch(self) -> None:
        batch: list[_DigestRequest] = []
        chars = 0
        while self._pending and len(batch) < self.max_paths:
            req = self._pending[0]
            if batch and (chars + len(req.path) + 3 > self.max_chars or req.conn.ssh.is_closed()):
                break
            batch.append(self._pending.pop(0))
            chars += len(req.path) + 3
        if not batch:
            return
        self._running += 1
        task = asyncio.ensure_future(self._run(batch))
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running -= 1
        if not task.cancelled():
            task.exception()  # retrieved; already handed to the waiters
        while self._pending and self._running < self.parallel:
            self._launch()

    async def _run(self, batch: list[_DigestRequest]) -> None:
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        conn = live[0].conn
        paths = list(dict.fromkeys(r.path for r in live))
        timeout = self.base_timeout + sum(r.size for r in live) / _DIGEST_RATE
        try:
            found = await self._exec(conn, paths, timeout) if len(paths) > 1 else {}
            for req in live:
                if req.future.done():
                    continue
                digest = found.get(req.path)
                if digest is None:
                    digest = await self._single(req.conn, req.path, req.size)
                req.future.set_result(digest)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter still waiting
            for req in live:
                if not req.future.done():
                    if isinstance(e, asyncio.CancelledError):
                        req.future.cancel()
                    else:
                        req.future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    async def _exec(self, conn: _Conn, paths: list[str], timeout: float) -> dict[str, str]:
        """One exec over ``paths``: the digests it printed (possibly none)."""
        for name in self.commands.order():
            command = _DIGEST_COMMANDS[name](paths)
            result = await self._run_command(conn, command, name, timeout)
            out = result.stdout if isinstance(result.stdout, str) else ""
            found = _parse_digests(out, paths)
            if found:
                self.commands.worked(name)
                return found
            if result.exit_status == 0:
                return found
            self.commands.failed(name)
        return {}

    async def _single(self, conn: _Conn, path: str, size: int) -> str:
        """One exec for one path, trying each command; DigestUnavailable lists what failed."""
        failures: list[str] = []
        timeout = self.base_timeout + size / _DIGEST_RATE
        for name in self.commands.order():
            result = await self._run_command(conn, _DIGEST_COMMANDS[name]([path]), name, timeout)
            out = result.stdout if isinstance(result.stdout, str) else ""
            match = _DIGEST_RE.match(out)
            if result.exit_status == 0 and match is not None:
                self.commands.worked(name)
                return match.group(1)
            self.commands.failed(name)
            detail = f"exit status {result.exit_status}" if result.exit_status else "no digest in its output"
            failures.append(f"exec of {name} gave {detail}")
        raise DigestUnavailable("; ".join(failures))

    async def _run_command(self, conn: _Conn, command: str, name: str,
                           timeout: float) -> asyncssh.SSHCompletedProcess:
        self.execs += 1
        try:
            result = await conn.ssh.run(command, stdin=asyncssh.DEVNULL, check=False, timeout=timeout)
        except asyncssh.ChannelOpenError as e:
            self.refused = True
            raise DigestUnavailable(f"exec refused: {e.reason}") from None
        except asyncssh.TimeoutError:
            raise DigestUnavailable(f"{name} timed out") from None
        self.refused = False
        return result


class SftpStore:
    """:class:`~relayd.relay.destinations.base.Store` over one pooled SFTP connection."""

    def __init__(self, conn: _Conn, block_size: int, requests: int, digests: DigestBatcher,
                 size: int = 0, readback_max: int = READBACK_MAX,
                 busy: Callable[[], bool] = lambda: False, bulk: OpenSSHBulk | None = None,
                 bulk_min: int = 0, fsync: bool = False) -> None:
        self._conn = conn
        self._fsync = fsync
        self._flushing: asyncio.Future[None] | None = None
        self.unflushed = False
        """Set when the server could not be asked to flush a file (no fsync@openssh.com)."""
        self._busy = busy
        self._bulk = bulk
        self._bulk_min = bulk_min
        self._readback_max = readback_max
        self._digests = digests
        assert conn.sftp is not None
        self._sftp = conn.sftp
        limit = conn.sftp.limits.max_write_len or MAX_BLOCK
        self._block = max(1, min(block_size, MAX_BLOCK, limit))
        self._requests = requests
        self._size = size

    async def size_of(self, path: str) -> int | None:
        """lstat: size of a regular file, None if missing."""
        try:
            attrs = await self._sftp.lstat(path)
        except asyncssh.SFTPNoSuchFile:
            return None
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR and attrs.type != asyncssh.FILEXFER_TYPE_UNKNOWN:
            raise DestinationError(f"{path} exists at the destination and is not a regular file", retryable=False)
        return attrs.size or 0

    async def makedirs(self, path: str) -> None:
        """mkdir -p on the server (skipped for directories this connection already made or saw)."""
        if path in self._conn.dirs:
            return
        await self._sftp.makedirs(path, exist_ok=True)
        self._conn.dirs.add(path)

    async def upload(self, temp: str, source: Path, offset: int, size: int) -> int:
        """Pipelined writes of ``source[offset:size]`` at their offsets; bounded memory.

        Up to ``requests`` worker coroutines share one offset counter: each takes the next block,
        reads it (plain ``pread``: the spool object was just written, so it is in the page cache;
        the kernel is asked to read ahead in case it is not) and waits for its write to be
        acknowledged. Each block in flight holds a slot of the connection's window, so the
        deliveries sharing a connection hold at most ``requests`` blocks together.
        """
        if self._bulk is not None and size - offset >= self._bulk_min and self._bulk.usable(source, temp):
            log.debug("upload of %s by the OpenSSH client (%d bytes from offset %d)", temp, size - offset, offset)
            sent = await self._bulk.upload(source, temp, offset, size)
            if self._fsync and self._can_fsync():
                self._start_flush(self._flush_path(temp))
            return sent
        pflags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | (asyncssh.FXF_TRUNC if offset == 0 else 0)
        fd = open_spool_object(source, size)
        try:
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(fd, offset, size - offset, os.POSIX_FADV_SEQUENTIAL)
            f = await self._sftp.open(temp, pflags, asyncssh.SFTPAttrs(permissions=0o644),
                                      encoding=None, block_size=0)  # 0: one request per write
            handed_off = False
            try:
                block = self._block
                window = self._conn.window
                nxt = offset

                async def worker() -> None:
                    nonlocal nxt
                    pread, write = os.pread, f.write
                    while nxt < size:
                        async with window:
                            if nxt >= size:
                                break
                            pos = nxt
                            n = min(block, size - pos)
                            nxt = pos + n
                            data = pread(fd, n, pos)
                            if len(data) != n:
                                raise DestinationError(f"spool object {source.name} ended early", retryable=False)
                            await write(data, pos)

                count = min(self._requests, -(-(size - offset) // block))
                if count == 1:
                    await worker()  # one block: no task needed
                else:
                    workers = {asyncio.create_task(worker()) for _ in range(max(count, 0))}
                    try:
                        while workers:
                            workers = await _settle(workers, asyncio.FIRST_EXCEPTION)
                    finally:
                        await _cancel_all(workers)
                if self._fsync:
                    self._start_flush(self._flush_close(f))  # the flush closes the handle
                    handed_off = True
            finally:
                if not handed_off:
                    await f.close()
        finally:
            os.close(fd)
        return size - offset

    def _start_flush(self, flush: Awaitable[None]) -> None:
        """Run the server's flush of the uploaded file while the caller verifies it (see
        :meth:`durable`, which waits for it before the rename)."""
        task = asyncio.ensure_future(flush)
        task.add_done_callback(_retrieve)
        self._flushing = task

    async def _flush_close(self, f: asyncssh.SFTPClientFile) -> None:
        try:
            await self._flush(f)
        finally:
            await f.close()

    async def _flush_path(self, path: str) -> None:
        """Flush a file written by the OpenSSH client: fsync works on any open handle of it."""
        f = await self._sftp.open(path, "rb", encoding=None)
        await self._flush_close(f)

    async def durable(self, temp: str) -> None:
        """Wait for the server's flush of ``temp`` started by :meth:`upload` (its error, if any)."""
        task, self._flushing = self._flushing, None
        if task is not None:
            await task

    async def aclose(self) -> None:
        """Let a flush still running (the delivery failed before :meth:`durable`) end first, so
        its handle is closed on the pooled session; its outcome no longer matters."""
        task, self._flushing = self._flushing, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    def _can_fsync(self) -> bool:
        """Whether the server offers fsync@openssh.com (notes it on the delivery if not)."""
        # asyncssh keeps the server's extensions private; it raises SFTPOpUnsupported on fsync()
        # without this one. Read the flag so the OpenSSH client path can decide the same way.
        handler = getattr(self._sftp, "_handler", None)
        supported = bool(getattr(handler, "_supports_fsync", True)) and not self._conn.no_fsync
        if not supported:
            self.unflushed = True
        return supported

    async def _flush(self, f: asyncssh.SFTPClientFile) -> None:
        """Have the server fsync an open file, if asked to and the server can."""
        if not self._fsync:
            return
        if self._conn.no_fsync:
            self.unflushed = True
            return
        try:
            await f.fsync()
        except (asyncssh.SFTPOpUnsupported, asyncssh.SFTPPermissionDenied):
            # Not offered, or refused by the server's policy (sftp-server -P fsync): noted on the
            # delivery. Any other error (an I/O error on the server's disk) fails the attempt.
            self._conn.no_fsync = True
            self.unflushed = True

    async def sha256(self, path: str) -> str:
        """Remote SHA-256 over an exec channel (batched with other deliveries'; see
        :class:`DigestBatcher`); DigestUnavailable if refused, timed out or unparsable.

        Tries ``openssl dgst -sha256 -r`` first (OpenSSL uses the CPU's SHA extensions: several
        times faster than coreutils), then ``sha256sum``; see :class:`DigestCommands`.
        """
        if self._size > self._readback_max:
            return await self._digests.sha256(self._conn, path, self._size)
        if self._busy() and not self._digests.refused:
            # Many deliveries at once: one exec hashes dozens of them (one request each
            # instead of four round trips per file).
            try:
                return await self._digests.sha256(self._conn, path, self._size)
            except DigestUnavailable:
                pass
        return await self._read_back(path)

    async def _read_back(self, path: str) -> str:
        """SHA-256 of what the server stored, read back over this SFTP session (small files).

        Three round trips and a few KiB on the wire cost less than starting a process on the
        server, and work on servers that refuse exec.
        """
        h = hashlib.sha256()
        async with self._sftp.open(path, "rb", encoding=None, block_size=self._block) as f:
            pos = 0
            while pos <= self._readback_max:
                data = await f.read(self._block, pos)
                if not isinstance(data, bytes) or not data:
                    break
                h.update(data)
                pos += len(data)
        return h.hexdigest()

    async def remove(self, path: str) -> None:
        """Remove; missing is fine."""
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await self._sftp.remove(path)

    async def replace(self, temp: str, final: str) -> None:
        """posix-rename@openssh.com; without it, plain rename (removing an existing final first)."""
        try:
            await self._sftp.posix_rename(temp, final)
            return
        except asyncssh.SFTPOpUnsupported:
            pass
        try:
            await self._sftp.rename(temp, final)
        except asyncssh.SFTPError:
            if await self.size_of(final) is None:
                raise
            # Not atomic: a reader may briefly see no file under the final name.
            await self._sftp.remove(final)
            await self._sftp.rename(temp, final)

    async def link_new(self, temp: str, final: str) -> bool:
        """Plain SFTP rename, which fails when the target exists."""
        try:
            await self._sftp.rename(temp, final)
        except asyncssh.SFTPError:
            if await self.size_of(final) is not None:
                return False
            raise
        return True

    async def sync_dir(self, path: str) -> None:
        """SFTP has no directory fsync; the server's rename is all we get."""

    async def write_small(self, path: str, data: bytes) -> None:
        """open (create, truncate) + one write + close."""
        pflags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
        async with self._sftp.open(path, pflags, asyncssh.SFTPAttrs(permissions=0o644), encoding=None,
                                   block_size=0) as f:
            await f.write(data, 0)
            await self._flush(f)


@register("sftp")
class SftpDestination:
    """Publishes to a remote SFTP server (see the module docstring)."""

    default_port = 22

    def __init__(self, config: DestinationConfig) -> None:
        self.name = config.name
        o = config.options
        self.host = str(o["host"])
        self.port = int(o.get("port") or self.default_port)
        self.user = str(o["user"])
        self.identity = Path(o["identity"])
        self.known_hosts = Path(o["known_hosts"])
        self.target = Target.parse(config.name, str(o["path"]))
        self.verify = parse_verify(config.name, o)
        self.on_conflict = parse_on_conflict(config.name, o)
        self.fsync = bool(o.get("fsync", True))
        """Have the server flush each temp file to disk before it is verified and renamed."""
        self.connect_timeout = float(o.get("connect_timeout", 30.0))
        self.block_size = min(int(o.get("block_size", MAX_BLOCK)), MAX_BLOCK)
        self.requests = int(o.get("requests", 64))
        concurrency = self.concurrency = int(o.get("concurrency") or 4)
        streams = int(o.get("streams") or 32)
        self.slots = concurrency * streams
        self.readback_max = READBACK_MAX
        """Verify files up to this size by reading them back (0: always exec), unless at least
        :data:`BATCH_DIGESTS_FROM` deliveries are in flight: then one exec hashes many at once."""
        self.active = 0
        """Deliveries in flight."""
        self.digest = DigestCommands()
        self.digests = DigestBatcher(self.digest, self.connect_timeout, parallel=1)
        self.pool = Pool(self.name, self._connect, concurrency, float(o.get("idle_timeout", 300.0)), streams)
        self.bulk = self._bulk_client(str(o.get("bulk_client") or "auto"))
        self.bulk_min = int(o.get("bulk_min_size") or BULK_MIN)

    def _bulk_client(self, mode: str) -> OpenSSHBulk | None:
        """The OpenSSH client for large uploads (see relayd/relay/destinations/openssh.py)."""
        if mode == "asyncssh":
            return None
        program = find_sftp_client()
        if program is None:
            if mode == "openssh":
                raise ValueError("bulk_client is openssh, but no OpenSSH sftp client is installed")
            log.info("dest=%s no OpenSSH sftp client found; large files go through asyncssh", self.name)
            return None
        return OpenSSHBulk(program=program, host=self.host, port=self.port, user=self.user, identity=self.identity,
                           known_hosts=self.known_hosts, connect_timeout=self.connect_timeout,
                           block_size=self.block_size, requests=self.requests, name=self.name,
                           limit=self.concurrency)

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"

    async def deliver(self, payload: Payload) -> Outcome:
        """Upload (or resume), verify, rename; see :func:`~relayd.relay.destinations.base.publish`."""
        final = self.target.final_path(payload)
        context = f"dest={self.name} delivery={payload.delivery_id}"
        try:
            self.active += 1
            async with self.pool.connection() as conn:
                store = SftpStore(conn, self.block_size, self.requests, self.digests, payload.size,
                                  self.readback_max, busy=lambda: self.active >= BATCH_DIGESTS_FROM,
                                  bulk=self.bulk, bulk_min=self.bulk_min, fsync=self.fsync)
                try:
                    outcome = await publish(store, payload, final, verify=self.verify,
                                            on_conflict=self.on_conflict, logger=log, context=context)
                finally:
                    await store.aclose()
                if store.unflushed:
                    outcome = replace(outcome, note="; ".join(filter(None, (
                        outcome.note, f"{self.where} has no fsync@openssh.com: the data was not flushed to the "
                        "server's disk before the rename"))))
        except DestinationError:
            raise
        except asyncssh.SFTPError as e:
            raise DestinationError(f"SFTP error at {self.where}: {e.reason} (code {e.code})", retryable=True) from e
        except (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError) as e:
            raise DestinationError(f"connection to {self.where} failed: {_describe(e)}", retryable=True) from e
        except Exception as e:  # a bug or an unforeseen library error: log it whole, try again later
            log.exception("%s unexpected error", context)
            raise DestinationError(f"unexpected error: {type(e).__name__}", retryable=True) from e
        finally:
            self.active -= 1
        if outcome.note:
            log.warning("%s %s", context, outcome.note)
        log.debug("%s delivered %s (%d bytes sent, resumed from %d, verified %s)", context,
                 outcome.remote_path, outcome.bytes_sent, outcome.resumed_from, outcome.verified)
        return outcome

    async def close(self) -> None:
        """Close the idle pooled connections."""
        await self.pool.close()

    async def _connect(self) -> _Conn:
        """Open a connection + SFTP session; map failures to :class:`DestinationError`."""
        algs = DEFAULT_ALGORITHMS
        options: dict[str, Any] = dict(
            username=self.user, known_hosts=str(self.known_hosts),
            agent_path=None, config=[], x509_trusted_certs=None, x509_trusted_cert_paths=[],
            preferred_auth="publickey", password=None, connect_timeout=self.connect_timeout,
            kex_algs=list(algs["kex"]), encryption_algs=list(algs["ciphers"]), mac_algs=list(algs["macs"]),
            signature_algs=list(algs["signatures"]), compression_algs=list(algs["compression"]),
            keepalive_interval=30, keepalive_count_max=3)
        if not self.known_hosts.is_file():
            raise DestinationError(f"known_hosts file for {self.where} is missing; the host key must be pinned",
                                   retryable=True)
        try:  # read on every connect, so a rotated key is picked up without a restart
            options["client_keys"] = [asyncssh.read_private_key(self.identity)]
        except (OSError, asyncssh.KeyImportError) as e:
            log.error("dest=%s cannot use identity %s: %s", self.name, self.identity, _describe(e))
            raise DestinationError(f"cannot use identity {self.identity.name} for {self.where}: {_describe(e)}",
                                   retryable=True) from None
        try:
            ssh = await asyncio.wait_for(asyncssh.connect(self.host, self.port, **options),
                                         self.connect_timeout)
        except asyncssh.HostKeyNotVerifiable as e:
            log.error("ALERT dest=%s host key mismatch for %s: the server's key is not the one pinned in %s "
                      "(%s); refusing to connect", self.name, self.where, self.known_hosts, e.reason)
            raise DestinationError(f"host key mismatch for {self.where}: not pinned in known_hosts "
                                   f"({e.reason})", retryable=True) from None
        except asyncssh.PermissionDenied as e:
            log.error("dest=%s authentication failed at %s as %s with %s: %s", self.name, self.where,
                      self.user, self.identity.name, e.reason)
            raise DestinationError(f"authentication failed at {self.where} as {self.user}", retryable=True) from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError) as e:
            raise DestinationError(f"cannot connect to {self.where}: {_describe(e)}", retryable=True) from None
        try:
            sftp = await asyncio.wait_for(self._open_session(ssh), self.connect_timeout)
        except BaseException as e:
            ssh.close()
            if isinstance(e, (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError)):
                raise DestinationError(f"SFTP session at {self.where} failed: {_describe(e)}",
                                       retryable=True) from None
            raise
        log.info("dest=%s connected to %s", self.name, self.where)
        return _Conn(ssh, sftp, asyncio.Semaphore(self.requests))

    async def _open_session(self, ssh: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient | None:
        """The per-connection session this kind needs (an SFTP client; None for kinds without)."""
        return await ssh.start_sftp_client()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's error as seen (its awaiter, if any, gets it too)."""
    if not task.cancelled():
        task.exception()


async def _settle(tasks: set[asyncio.Task[Any]], when: str) -> set[asyncio.Task[Any]]:
    """Wait for some tasks; raise the first error (retrieving all); return the rest."""
    done, rest = await asyncio.wait(tasks, return_when=when)
    errors = [e for e in (t.exception() for t in done) if e is not None]
    if errors:
        await _cancel_all(rest)
        raise errors[0]
    return rest


async def _cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait for them, retrieving their errors (the first one is already raised)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()


def _describe(e: BaseException) -> str:
    """A short text for an exception (asyncssh errors carry ``reason``)."""
    reason = getattr(e, "reason", None)
    if reason:
        return str(reason)
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
