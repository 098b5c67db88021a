"""Tenant spool layout and the commit door.

Layout under ``node.spool_dir``::

    <tenant>/inbox/       the tenant's SFTP root, what users see as "/"
    <tenant>/incoming/    uploads in progress (one private file per open write handle)
    <tenant>/objects/     committed content, one immutable hard link per transfer id

:meth:`Spool.commit` is the single door into the system: the data is fsynced, fixed as
``objects/<id>`` (a hard link no later write can reach, because relayd never opens an inbox
file for writing in place), the transfer row is committed in the journal, and only then is the
name published in the inbox. A crash before the journal commit leaves an orphan object that
:meth:`Spool.recover` removes; a crash after it leaves a committed transfer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from relayd.journal import DroppedFile, Journal, Transfer, new_id, utc_now
from relayd.integrity import Notary
from relayd.integrity.manifest import Signed as SignedManifest, new_hashers
from relayd.metrics import Metrics

__all__ = ["Spool", "CommitRequest", "TenantDirs", "fsync_dir", "hash_file", "scan_usage"]

log = logging.getLogger("relayd.spool")

_HASH_CHUNK = 1 << 20


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that a link, rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digests_of(fd: int, names: Sequence[str]) -> dict[str, str]:
    """Hex digests ``names`` of the file open at ``fd`` (streamed; the offset is not used)."""
    hashers = new_hashers(names)
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    pos = 0
    while True:
        n = os.preadv(fd, [buf], pos)
        if not n:
            break
        for h in hashers.values():
            h.update(view[:n])
        pos += n
    return {name: h.hexdigest() for name, h in hashers.items()}


def hash_file(path: str | Path | None = None, fd: int | None = None) -> tuple[str, int]:
    """Stream a file through SHA-256 (bounded memory); return ``(hexdigest, size)``."""
    h = hashlib.sha256()
    own = fd is None
    if own:
        assert path is not None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    assert fd is not None
    size = 0
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = os.preadv(fd, [buf], size)
            if not n:
                break
            h.update(view[:n])
            size += n
    finally:
        if own:
            os.close(fd)
    return h.hexdigest(), size


@dataclass(frozen=True)
class TenantDirs:
    """The three folders of one tenant's spool."""

    inbox: Path
    incoming: Path
    objects: Path


@dataclass(frozen=True)
class CommitRequest:
    """What the commit door needs to know about a finished upload.

    ``src`` is the finished file (a private staging file, or an uncommitted temp-named file in
    the inbox for ``commit: rename``). ``publish_to`` is the inbox path to make it visible under
    (renamed atomically, replacing whatever was there); ``sha256`` may be None to have it computed.
    ``destinations`` (from the tenant's routes) each get a pending delivery in the same journal
    transaction; a transfer with none stays committed and is listed as ``unrouted``.
    """

    tenant: str
    user: str
    source: str
    path: str
    src: Path
    publish_to: Path
    size: int
    sha256: str | None = None
    fd: int | None = None
    destinations: tuple[str, ...] = ()
    digests: Mapping[str, str] = field(default_factory=dict)
    """Extra digests already computed while receiving (``integrity.digests``), by name."""
    origin: tuple[str, str, int | None] | None = None
    """For a file a peer relayd sent: (sender gateway, sender transfer id, changed regions)."""
    dropped: DroppedFile | None = None
    """For a file taken from a drop folder: the original, recorded with the transfer (dedup)."""


@dataclass(frozen=True)
class _Fixed:
    """A file past the pre-journal steps of a commit (see :meth:`Spool._fix`)."""

    transfer: Transfer
    obj: Path
    signed: SignedManifest | None


class Spool:
    """Owns the spool directory tree: layout, commit, recovery."""

    def __init__(self, spool_dir: Path, journal: Journal, notary: Notary | None = None):
        self.root = spool_dir
        self.journal = journal
        self.notary = notary
        """Signs a manifest per committed file (None: no manifests, e.g. in unit tests)."""
        self.metrics: Metrics | None = None
        """Counts committed files and bytes per tenant (set by the daemon)."""

    def dirs(self, tenant: str) -> TenantDirs:
        """The folders of ``tenant`` (not created)."""
        base = self.root / tenant
        return TenantDirs(inbox=base / "inbox", incoming=base / "incoming", objects=base / "objects")

    def ensure_tenant(self, tenant: str) -> TenantDirs:
        """Create a tenant's folders if missing."""
        d = self.dirs(tenant)
        for p in (d.inbox, d.incoming, d.objects):
            p.mkdir(parents=True, exist_ok=True, mode=0o750)
        return d

    def new_staging(self, tenant: str) -> tuple[Path, int]:
        """Create a private staging file for an upload; return its path and an open RDWR fd."""
        d = self.dirs(tenant)
        path = d.incoming / new_id()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        return path, fd

    def commit(self, req: CommitRequest) -> Transfer:
        """Make an upload durable and record it; blocking (run it in a worker thread).

        Order: fsync data → link ``objects/<id>`` → fsync objects dir → journal commit →
        rename into the inbox → fsync inbox dir. Returns the committed :class:`Transfer`.
        """
        fixed = self._fix(req)
        t = fixed.transfer
        fsync_dir(fixed.obj.parent)
        try:
            self.journal.add_transfer(t, req.destinations, fixed.signed, req.origin, req.dropped)
        except BaseException:
            _unlink_quiet(fixed.obj)
            raise
        os.rename(req.src, req.publish_to)
        fsync_dir(req.publish_to.parent)
        if req.src.parent != req.publish_to.parent:
            fsync_dir(req.src.parent)
        self._committed(req, t)
        return t

    def commit_many(self, reqs: Sequence[CommitRequest]) -> list[Transfer | Exception]:
        """Group commit: :meth:`commit` for several files, in the same order of steps, with one
        journal transaction and one fsync per folder for all of them; blocking.

        Returns, per request, its committed :class:`Transfer` or the exception it met. A file whose
        own steps fail (before the journal) fails alone; a failed journal commit fails them all
        (nothing recorded, nothing published). Raises only if fsyncing a folder fails after the
        journal commit (the transfers are recorded; their names may not be durable yet).
        """
        results: list[Transfer | Exception] = []
        fixed: list[tuple[int, CommitRequest, _Fixed]] = []
        for req in reqs:
            try:
                f = self._fix(req)
            except Exception as exc:  # noqa: BLE001 - reported for this file only
                results.append(exc)
                continue
            fixed.append((len(results), req, f))
            results.append(f.transfer)
        if not fixed:
            return results
        try:
            for folder in {f.obj.parent for _, _, f in fixed}:
                fsync_dir(folder)
            self.journal.add_transfers([(f.transfer, req.destinations, f.signed, req.origin, req.dropped)
                                        for _, req, f in fixed])
        except Exception as exc:  # noqa: BLE001 - nothing of the batch is committed
            for i, _, f in fixed:
                _unlink_quiet(f.obj)
                results[i] = exc
            return results
        folders: set[Path] = set()
        for i, req, f in fixed:
            try:
                os.rename(req.src, req.publish_to)
            except OSError as exc:
                results[i] = exc
                continue
            folders.update((req.publish_to.parent, req.src.parent))
        for folder in folders:
            fsync_dir(folder)
        for i, req, f in fixed:
            if results[i] is f.transfer:
                self._committed(req, f.transfer)
        return results

    def _fix(self, req: CommitRequest) -> "_Fixed":
        """The steps of a commit before the journal: check the target, fsync the data, take its
        digests, link it as ``objects/<id>`` (read-only), sign the manifest. The objects folder
        is not fsynced here."""
        d = self.dirs(req.tenant)
        try:
            st = os.lstat(req.publish_to)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(21, "Target is not a regular file")
        extra = self.notary.digests if self.notary is not None else ()
        fd = req.fd if req.fd is not None else os.open(req.src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
            sha256, size = (req.sha256, req.size) if req.sha256 else hash_file(fd=fd)
            digests = {"sha256": sha256, **{n: v for n, v in req.digests.items() if n in extra}}
            missing = [n for n in extra if n not in digests]
            if missing:
                digests.update(_digests_of(fd, missing))
        finally:
            if req.fd is None:
                os.close(fd)
        tid = new_id()
        obj = d.objects / tid
        os.link(req.src, obj)
        os.chmod(obj, 0o444)
        transfer = Transfer(id=tid, tenant=req.tenant, user=req.user, source=req.source, path=req.path,
                            size=size, sha256=sha256, received_at=utc_now(), state="committed", object=tid)
        signed = None
        if self.notary is not None:
            signed = self.notary.sign(transfer_id=tid, tenant=req.tenant, user=req.user, path=req.path, size=size,
                                      digests=digests, received_at=transfer.received_at, source=req.source)
        return _Fixed(transfer, obj, signed)

    def _committed(self, req: CommitRequest, t: Transfer) -> None:
        """Count and log a finished commit."""
        if self.metrics is not None:
            self.metrics.committed(req.tenant, t.size)
        log.info("committed transfer=%s tenant=%s user=%s size=%d sha256=%s destinations=%s", t.id, req.tenant,
                 req.user, t.size, t.sha256, ",".join(req.destinations) or "(unrouted)",
                 extra={"event.action": "file-committed", "event.category": "file", "event.outcome": "success",
                        "relayd.transfer_id": t.id, "relayd.tenant": req.tenant, "file.size": t.size,
                        "file.hash.sha256": t.sha256})

    def object_path(self, transfer: Transfer) -> Path:
        """Where the committed content of ``transfer`` lives."""
        return self.dirs(transfer.tenant).objects / transfer.object

    def purge(self, tenant: str, retention: float, now: float | None = None) -> tuple[int, int, int]:
        """Retention: remove spool objects of ``tenant`` whose deliveries all ended ``retention``
        seconds ago; the transfers stay in the journal as ``purged``. The inbox name goes too when
        it still is that object (not replaced by a later upload). Blocking.

        Returns ``(purged, inbox_bytes, inbox_files)``: the last two are what the tenant's quota
        gets back.
        """
        when = datetime.fromtimestamp((time.time() if now is None else now) - retention, timezone.utc)
        cutoff = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        purged = inbox_bytes = inbox_files = 0
        d = self.dirs(tenant)
        while True:
            batch = self.journal.purgeable(tenant, cutoff)
            if not batch:
                break
            for t in batch:
                obj = d.objects / t.object
                try:
                    ost = os.lstat(obj)
                except FileNotFoundError:
                    continue
                name = d.inbox / t.path.lstrip("/")
                try:
                    nst = os.lstat(name)
                except (FileNotFoundError, NotADirectoryError):
                    nst = None
                if nst is not None and (nst.st_dev, nst.st_ino) == (ost.st_dev, ost.st_ino):
                    _unlink_quiet(name)
                    inbox_bytes += nst.st_size
                    inbox_files += 1
                _unlink_quiet(obj)
            fsync_dir(d.objects)
            self.journal.mark_purged([t.id for t in batch])
            purged += len(batch)
        if purged:
            log.info("retention: purged %d transfer(s) of tenant %s (%d file(s) left the inbox)", purged, tenant,
                     inbox_files)
        return purged, inbox_bytes, inbox_files

    def recover(self, tenants: Iterable[str]) -> dict[str, int]:
        """Crash recovery: drop partial uploads and objects whose commit never reached the journal,
        and finish the publication of commits that reached it but not the inbox.

        A staging file that is a hard link of a committed object was cut off between the journal
        commit and the rename into the inbox: it is renamed into place now (if its transfer is
        still the newest of that path), so the inbox shows every committed file.
        """
        partial = orphans = republished = 0
        for tenant in tenants:
            d = self.ensure_tenant(tenant)
            known = self.journal.object_names(tenant)
            by_inode: dict[tuple[int, int], str] | None = None
            for entry in os.scandir(d.incoming):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    if by_inode is None:
                        by_inode = {}
                        for obj in os.scandir(d.objects):
                            if obj.name in known:
                                ost = obj.stat(follow_symlinks=False)
                                by_inode[(ost.st_dev, ost.st_ino)] = obj.name
                    name = by_inode.get((st.st_dev, st.st_ino))
                    if name is not None and self._republish(tenant, d, name, Path(entry.path)):
                        republished += 1
                        continue
                _unlink_quiet(Path(entry.path))
                partial += 1
            for entry in os.scandir(d.objects):
                if entry.name not in known:
                    _unlink_quiet(Path(entry.path))
                    orphans += 1
            if partial or orphans:
                fsync_dir(d.incoming)
                fsync_dir(d.objects)
        if partial or orphans:
            log.warning("recovery: removed %d partial upload(s) and %d uncommitted object(s)", partial, orphans)
        if republished:
            log.warning("recovery: published %d committed file(s) whose rename into the inbox was cut off",
                        republished)
        return {"partial_uploads": partial, "orphan_objects": orphans, "republished": republished}

    def _republish(self, tenant: str, d: TenantDirs, object_name: str, staging: Path) -> bool:
        """Rename ``staging`` (a link of committed ``object_name``) to its transfer's inbox path."""
        transfer = self.journal.get_transfer(object_name)  # objects are named by their transfer id
        if transfer is None or transfer.object != object_name or transfer.tenant != tenant \
                or transfer.state != "committed":
            return False
        newest = self.journal.latest_transfer(tenant, transfer.path)
        if newest is None or newest.id != transfer.id:
            return False  # a later upload of the same path owns the name now
        parts = [p for p in transfer.path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return False
        parent = d.inbox
        for part in parts[:-1]:
            parent = parent / part
            try:
                if not stat.S_ISDIR(os.lstat(parent).st_mode):
                    return False
            except FileNotFoundError:
                return False
        target = parent / parts[-1]
        try:
            if not stat.S_ISREG(os.lstat(target).st_mode):
                return False
        except FileNotFoundError:
            pass
        os.rename(staging, target)
        fsync_dir(parent)
        log.info("recovery: published transfer=%s tenant=%s path=%s", transfer.id, tenant, transfer.path)
        return True


def scan_usage(inbox: Path) -> tuple[int, int]:
    """Bytes and regular-file count under a tenant's inbox (for quota accounting)."""
    total = files = 0
    stack = [str(inbox)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    files += 1
    return total, files


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
