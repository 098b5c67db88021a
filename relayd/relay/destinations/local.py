"""The ``local`` destination: a directory on this host (an archive, a mounted share).

Data is copied in chunks (never a whole file in memory), fsynced, re-read to verify, then renamed
into place (``os.rename`` for overwrite, ``os.link`` + unlink where the final name must not be
replaced), and the directory is fsynced. Blocking file work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

from relayd.config.model import DestinationConfig
from relayd.relay.destinations.base import (DestinationError, Outcome, Payload, Target, open_spool_object,
                                            parse_on_conflict, parse_verify, publish, register)

log = logging.getLogger("relayd.relay.destinations.local")

CHUNK = 1 << 20
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class LocalStore:
    """:class:`~relayd.relay.destinations.base.Store` over the local file system."""

    async def size_of(self, path: str) -> int | None:
        """Size of the regular file at ``path`` (symlinks are not followed), or None."""
        return await asyncio.to_thread(_size_of, path)

    async def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents, fsyncing each parent that gained an entry."""
        await asyncio.to_thread(_makedirs_durable, path)

    async def upload(self, temp: str, source: Path, offset: int, size: int) -> int:
        """Copy ``source[offset:size]`` into ``temp`` at ``offset`` in chunks and fsync it."""
        return await asyncio.to_thread(_copy, temp, source, offset, size)

    async def sha256(self, path: str) -> str:
        """Re-read ``path`` and hash it (streamed)."""
        return await asyncio.to_thread(_sha256, path)

    async def remove(self, path: str) -> None:
        """Unlink ``path``; missing is fine."""
        await asyncio.to_thread(_unlink, path)

    async def replace(self, temp: str, final: str) -> None:
        """``os.rename``: atomic, replaces ``final``."""
        await asyncio.to_thread(os.rename, temp, final)

    async def link_new(self, temp: str, final: str) -> bool:
        """``os.link`` then unlink ``temp``: never replaces ``final``."""
        return await asyncio.to_thread(_link_new, temp, final)

    async def durable(self, temp: str) -> None:
        """Nothing left to wait for: :meth:`upload` fsyncs before it returns."""

    async def sync_dir(self, path: str) -> None:
        """fsync the directory so the rename survives a power loss."""
        await asyncio.to_thread(_fsync_dir, path)

    async def write_small(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` (created 0644, truncated) and fsync it."""
        await asyncio.to_thread(_write_small, path, data)


def _write_small(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_of(path: str) -> int | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise DestinationError(f"{path} exists and is not a regular file", retryable=False)
    return st.st_size


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise DestinationError(f"{directory} exists and is not a directory", retryable=False) from None
            continue
        _fsync_dir(os.path.dirname(directory))


def _copy(temp: str, source: Path, offset: int, size: int) -> int:
    """Stream the source into the temp file from ``offset``; fsync; return bytes written."""
    src = open_spool_object(source, size)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if offset == 0 else 0)
        dst = os.open(temp, flags, 0o644)
        try:
            if offset:
                os.ftruncate(dst, offset)  # the temp is never longer than what we resume after
            pos = offset
            while pos < size:
                data = os.pread(src, min(CHUNK, size - pos), pos)
                if not data:
                    raise DestinationError(f"spool object {source.name} ended early at {pos}", retryable=False)
                view = memoryview(data)
                while view:
                    written = os.pwrite(dst, view, pos)
                    view = view[written:]
                    pos += written
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return size - offset


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _link_new(temp: str, final: str) -> bool:
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
        # No hard links on this file system: check, then rename (a small race window).
        if os.path.lexists(final):
            return False
        os.rename(temp, final)
        return True
    os.unlink(temp)
    return True


@register("local")
class LocalDestination:
    """Publishes into a local directory tree (``path`` template, with placeholders)."""

    def __init__(self, config: DestinationConfig) -> None:
        self.name = config.name
        options = config.options
        self.target = Target.parse(config.name, str(options["path"]))
        self.verify = parse_verify(config.name, options)
        self.on_conflict = parse_on_conflict(config.name, options)
        self.slots = int(options.get("concurrency") or 4)
        self._store = LocalStore()

    async def deliver(self, payload: Payload) -> Outcome:
        """Copy, fsync, verify, rename, fsync the directory."""
        final = os.path.abspath(self.target.final_path(payload))
        context = f"dest={self.name} delivery={payload.delivery_id}"
        try:
            outcome = await publish(self._store, payload, final, verify=self.verify,
                                    on_conflict=self.on_conflict, logger=log, context=context)
        except DestinationError:
            raise
        except OSError as e:
            # Disk full, permissions, I/O errors: an admin can fix them, so try again later.
            raise DestinationError(f"local file system error: {e}", retryable=True) from e
        except Exception as e:  # a bug: log it whole, try again later
            log.exception("%s unexpected error", context)
            raise DestinationError(f"unexpected error: {type(e).__name__}", retryable=True) from e
        log.debug("%s delivered %s (%d bytes sent, resumed from %d, verified %s)", context,
                 outcome.remote_path, outcome.bytes_sent, outcome.resumed_from, outcome.verified)
        return outcome

    async def close(self) -> None:
        """Nothing to close."""
