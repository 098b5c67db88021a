"""Checksums of files in a tenant's view, for clients that verify what they uploaded.

Two doors, one set of rules (those of :class:`~relayd.gateway.sftp.TenantSFTPServer`: chroot,
no symlinks, ``download`` permission):

* the SFTP extensions ``check-file-handle`` / ``check-file-name`` (and ``check-file``, the
  older name paramiko sends with a handle) of draft-ietf-secsh-filexfer-extensions;
* an SSH exec request of exactly ``sha256sum|sha1sum|md5sum [--] <path>``, answered in-process
  (no shell, no subprocess) with coreutils' output format and exit status. rclone's sftp backend
  uses this with ``md5sum_command``/``sha1sum_command``.

Files are hashed in bounded pieces on a small dedicated thread pool, streamed with ``pread``:
the event loop never blocks on a large file and the commit path keeps the default executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import shlex
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

import asyncssh
from asyncssh.packet import String
from asyncssh.sftp import FXF_READ, SFTPAttrs

from relayd.gateway.sftp import ReadHandle, TenantSFTPServer

__all__ = ["ALGORITHMS", "ChecksumCommand", "CommandRefused", "CheckFileReply", "parse_checksum_command",
           "pick_algorithm", "hash_fd", "check_file", "run_checksum", "format_line", "quote_name"]

log = logging.getLogger("relayd.gateway.checksum")

ALGORITHMS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "sha1": hashlib.sha1, "md5": hashlib.md5}
PROGRAMS = {"sha256sum": "sha256", "sha1sum": "sha1", "md5sum": "md5"}
ADVERTISED = b"sha256,sha1,md5"

_READ_CHUNK = 1 << 20          # one pread
_PIECE = 8 << 20               # bytes hashed per worker-thread call (a cancellation point)
_MIN_BLOCK = 256               # the draft's smallest block size for per-block hashes
_MAX_REPLY_HASH_BYTES = 64 * 1024
_MAX_COMMAND = 8192

# Unquoted characters a shell would treat as syntax or expansion; '#' and '~' only start a word.
_SHELL_META = frozenset(";&|<>()$`*?[{!\n\r\x00")
_WORD_START_META = frozenset("#~")

_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The digest thread pool (two workers: hashing must not starve commits of threads)."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="relayd-digest")
    return _executor


# -- the exec command ---------------------------------------------------------------------------


class CommandRefused(ValueError):
    """An exec command that is not exactly ``<sum-program> [--] <path>``."""


@dataclass(frozen=True)
class ChecksumCommand:
    """A parsed ``sha256sum <path>`` request."""

    program: str     # "sha256sum", "sha1sum" or "md5sum"
    algorithm: str   # key of ALGORITHMS
    path: str        # exactly as the client wrote it (after shell unquoting)


def _check_quoting(command: str) -> None:
    """Refuse shell syntax or expansions outside quotes (and ``$``/backquote inside ``"..."``)."""
    quote = ""
    word_start = True
    i, n = 0, len(command)
    while i < n:
        c = command[i]
        if quote == "'":
            if c == "'":
                quote = ""
        elif quote == '"':
            if c == "\\":
                # shlex keeps the backslash of \$, \` and \<newline> where a shell drops it
                if i + 1 < n and command[i + 1] in "$`\n\r":
                    raise CommandRefused("escaped expansion in double quotes")
                i += 1
            elif c == '"':
                quote = ""
            elif c in "$`":
                raise CommandRefused("shell expansion in double quotes")
        elif c == "\\":
            if i + 1 < n and command[i + 1] in "\n\r":
                raise CommandRefused("line continuation")
            i += 1
            word_start = False
        elif c in " \t":
            word_start = True
        elif c in "'\"":
            quote = c
            word_start = False
        elif c in _SHELL_META or (word_start and c in _WORD_START_META):
            raise CommandRefused(f"shell metacharacter {c!r}")
        else:
            word_start = False
        i += 1
    if quote:
        raise CommandRefused("unterminated quote")


def parse_checksum_command(command: str) -> ChecksumCommand:
    """Parse an exec command; raise :class:`CommandRefused` unless it is exactly one of
    ``sha256sum <path>``, ``sha1sum <path>``, ``md5sum <path>`` (``--`` allowed before the path).

    Quoting follows the POSIX shell (``shlex``); options, several paths, standard input (``-``)
    and any unquoted shell syntax are refused.
    """
    if len(command) > _MAX_COMMAND:
        raise CommandRefused("command too long")
    _check_quoting(command)
    try:
        words = shlex.split(command, comments=False, posix=True)
    except ValueError as exc:
        raise CommandRefused(str(exc)) from None
    if not words or words[0] not in PROGRAMS:
        raise CommandRefused("not a checksum command")
    args = words[1:]
    if args and args[0] == "--":
        args = args[1:]
    elif args and args[0].startswith("-"):
        raise CommandRefused("options are not supported")
    if len(args) != 1:
        raise CommandRefused("exactly one path is required")
    if args[0] in ("", "-"):
        raise CommandRefused("a file path is required (standard input is not read)")
    return ChecksumCommand(program=words[0], algorithm=PROGRAMS[words[0]], path=args[0])


def format_line(hexdigest: str, path: str) -> str:
    """One output line as coreutils prints it (names with ``\\``, LF or CR escaped, line prefixed
    with a backslash)."""
    if any(c in path for c in "\\\n\r"):
        escaped = path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{hexdigest}  {escaped}\n"
    return f"{hexdigest}  {path}\n"


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./,+%@]{}~#")


def quote_name(name: str) -> str:
    """A file name quoted for an error message the way coreutils does (shell-escape style)."""
    if name and all(c in _PLAIN or ord(c) > 127 for c in name) and name[0] not in "~#":
        return name
    if "'" in name and not any(c in name for c in "$`\\\"") and all(c.isprintable() for c in name):
        return f'"{name}"'
    out = []
    for c in name:
        if c == "'":
            out.append("'\\''")
        elif not c.isprintable():
            esc = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\{ord(c):03o}")
            out.append(f"'$'{esc}''")
        else:
            out.append(c)
    return "'" + "".join(out) + "'"


# -- hashing ------------------------------------------------------------------------------------


def _feed(fd: int, hasher: Any, offset: int, end: int) -> int:
    """Feed bytes ``[offset, end)`` of ``fd`` to ``hasher``; return the offset reached (< end at EOF)."""
    while offset < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - offset), offset)
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    return offset


def _block_digests(fd: int, algorithm: str, offset: int, end: int, block_size: int) -> list[bytes]:
    """Digests of consecutive ``block_size`` blocks of ``[offset, end)`` (the last may be short)."""
    out = []
    while offset < end:
        hasher = ALGORITHMS[algorithm]()
        reached = _feed(fd, hasher, offset, min(end, offset + block_size))
        if reached == offset:
            break
        out.append(hasher.digest())
        offset = reached
    return out


async def _in_pool(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on the digest pool. If the caller is cancelled (client gone), the piece in flight
    still finishes before the cancellation goes on, so no thread reads a descriptor after the
    caller closed it."""
    fut = asyncio.get_running_loop().run_in_executor(_pool(), fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


async def hash_fd(fd: int, algorithm: str, start: int = 0, length: int = 0, block_size: int = 0,
                  progress: Callable[[], None] | None = None) -> bytes:
    """Hash ``length`` bytes of ``fd`` from ``start`` (0: to the end of the file).

    ``block_size`` 0 gives one digest of the range; otherwise the concatenated digests of each
    block. The work runs on the digest pool in pieces of at most 8 MiB; ``progress`` is called after
    each piece (it may raise to stop the work).
    """
    size = os.fstat(fd).st_size
    start = min(start, size)
    end = size if length == 0 else min(size, start + length)
    if block_size == 0:
        return await _digest_range(fd, algorithm, start, end, progress)
    if block_size < _MIN_BLOCK:
        raise asyncssh.SFTPFailure(f"Block size must be 0 or at least {_MIN_BLOCK}")
    blocks = -(-(end - start) // block_size)
    if blocks * ALGORITHMS[algorithm]().digest_size > _MAX_REPLY_HASH_BYTES:
        raise asyncssh.SFTPFailure("Too many blocks: use a larger block size or a shorter range")
    digests: list[bytes] = []
    if block_size >= _PIECE:  # large blocks: each one in pieces
        for pos in range(start, end, block_size):
            digests.append(await _digest_range(fd, algorithm, pos, min(end, pos + block_size), progress))
        return b"".join(digests)
    span = _PIECE // block_size * block_size  # small blocks: many per piece
    for pos in range(start, end, span):
        digests += await _in_pool(_block_digests, fd, algorithm, pos, min(end, pos + span), block_size)
        if progress is not None:
            progress()
    return b"".join(digests)


async def _digest_range(fd: int, algorithm: str, pos: int, end: int,
                        progress: Callable[[], None] | None) -> bytes:
    """One digest of ``[pos, end)``, fed on the digest pool in pieces."""
    hasher = ALGORITHMS[algorithm]()
    while pos < end:
        reached = await _in_pool(_feed, fd, hasher, pos, min(end, pos + _PIECE))
        if progress is not None:
            progress()
        if reached == pos:
            break
        pos = reached
    return bytes(hasher.digest())


def pick_algorithm(offered: str) -> str:
    """The first supported name of a client's comma-separated preference list."""
    for name in offered.split(","):
        if name.strip().lower() in ALGORITHMS:
            return name.strip().lower()
    raise asyncssh.SFTPOpUnsupported("No supported hash algorithm (supported: sha256, sha1, md5)")


def _progress(server: TenantSFTPServer) -> Callable[[], None]:
    """Called between pieces: the session is not idle; stop if the client has gone."""
    chan = server.channel

    def progress() -> None:
        server.last_activity = time.monotonic()
        if chan.is_closing():
            raise asyncssh.SFTPConnectionLost("Connection lost")
    return progress


async def _open_for_reading(server: TenantSFTPServer, path: bytes) -> ReadHandle:
    """Open ``path`` exactly as a download would (same resolution and checks); regular files only."""
    handle = await server.open(path, FXF_READ, SFTPAttrs())
    if not isinstance(handle, ReadHandle):  # pragma: no cover - a read open yields a ReadHandle
        raise asyncssh.SFTPFailure("Not a regular file")
    if not stat.S_ISREG(os.fstat(handle.fd).st_mode):
        os.close(handle.fd)
        raise asyncssh.SFTPPermissionDenied("Permission denied (not a regular file)")
    return handle


# -- the SFTP extension -------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckFileReply:
    """The body of a check-file SSH_FXP_EXTENDED_REPLY (encoded by asyncssh's handler)."""

    algorithm: str
    hashes: bytes

    def encode(self, sftp_version: int) -> bytes:
        """``string "check-file"``, ``string algorithm``, then the raw hash bytes."""
        return String(b"check-file") + String(self.algorithm.encode("ascii")) + self.hashes

    def __str__(self) -> str:
        return f"check-file {self.algorithm} {self.hashes.hex()[:128]}"


async def check_file(server: TenantSFTPServer, target: object | bytes, offered: str, start: int,
                     length: int, block_size: int) -> CheckFileReply:
    """Answer a check-file request: ``target`` is an open handle's file object or a client path."""
    if "download" not in server.perms:
        raise asyncssh.SFTPPermissionDenied("Permission denied (download not granted)")
    algorithm = pick_algorithm(offered)
    if isinstance(target, bytes):
        handle = await _open_for_reading(server, target)
        fd, vpath = handle.fd, handle.vpath
    elif isinstance(target, ReadHandle):
        # A private duplicate: the digest never reads a descriptor number closed and reused meanwhile.
        fd, vpath = os.dup(target.fd), target.vpath
    else:
        raise asyncssh.SFTPPermissionDenied("Permission denied (file not open for reading)")
    try:
        hashes = await hash_fd(fd, algorithm, start, length, block_size, _progress(server))
    except OSError:
        raise asyncssh.SFTPFailure("Reading the file failed") from None
    finally:
        os.close(fd)
    ident = server.ident
    log.info("check-file conn=%s user=%s tenant=%s path=%s algorithm=%s offset=%d length=%d block=%d",
             ident.conn_id, ident.user.name, ident.tenant.name, vpath, algorithm, start, length, block_size)
    return CheckFileReply(algorithm, hashes)


# -- the exec command ---------------------------------------------------------------------------


def _error_text(exc: asyncssh.SFTPError) -> str:
    """coreutils' wording for an open failure (never a real path)."""
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return "Permission denied"
    reason = str(exc.reason)
    if "Is a directory" in reason:
        return "Is a directory"
    if "too long" in reason:
        return "File name too long"
    return "No such file or directory"


def _send(chan: asyncssh.SSHServerChannel[bytes], text: str, stderr: bool = False) -> None:
    """Write to the client unless it is already gone."""
    if chan.is_closing():
        return
    data = text.encode("utf-8", "surrogateescape")
    try:
        if stderr:
            chan.write_stderr(data)
        else:
            chan.write(data)
    except (OSError, asyncssh.Error):
        pass


async def run_checksum(server: TenantSFTPServer, cmd: ChecksumCommand,
                       chan: asyncssh.SSHServerChannel[bytes]) -> None:
    """Serve one ``sha256sum <path>`` exec: the line on stdout and exit 0, or coreutils' error on
    stderr and exit 1."""
    ident = server.ident
    status = 1
    try:
        try:
            handle = await _open_for_reading(server, cmd.path.encode("utf-8", "surrogateescape"))
        except asyncssh.SFTPError as exc:
            text = _error_text(exc)
            log.warning("exec %s refused: %s conn=%s user=%s tenant=%s path=%r", cmd.program, text,
                        ident.conn_id, ident.user.name, ident.tenant.name, cmd.path[:512])
            _send(chan, f"{cmd.program}: {quote_name(cmd.path)}: {text}\n", stderr=True)
            return
        try:
            digest = await hash_fd(handle.fd, cmd.algorithm, progress=_progress(server))
        except asyncssh.SFTPConnectionLost:
            log.info("exec %s abandoned (client gone) conn=%s user=%s tenant=%s path=%s", cmd.program,
                     ident.conn_id, ident.user.name, ident.tenant.name, handle.vpath)
            return
        except OSError:
            _send(chan, f"{cmd.program}: {quote_name(cmd.path)}: Input/output error\n", stderr=True)
            return
        finally:
            os.close(handle.fd)
        _send(chan, format_line(digest.hex(), cmd.path))
        status = 0
        log.info("exec %s conn=%s user=%s tenant=%s path=%s", cmd.program, ident.conn_id, ident.user.name,
                 ident.tenant.name, handle.vpath)
    finally:
        server.exit()
        if not chan.is_closing():
            try:
                chan.exit(status)
            except (OSError, asyncssh.Error):
                pass
