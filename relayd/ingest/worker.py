"""Blocking drop-folder I/O, run in the ingest worker threads: scan, probe, take, finalize.

Taking a settled file (:func:`ingest`):

1. open it with ``O_NOFOLLOW`` and check that the open file is the one that settled (size, mtime,
   inode) and that its real path is the expected one inside the folder (no symlink on the way);
2. if the journal already holds this original (same path, size, mtime and SHA-256) it was
   committed before a crash: only finish the removal (no second transfer);
3. stage it in the tenant's ``incoming/``: a hard link when it is on the spool's file system and
   the original goes away afterwards (``after: delete``), else a streamed copy whose digest is
   verified against the original's; the SHA-256 is streamed either way;
4. check that it did not change or vanish while being read;
5. :meth:`relayd.spool.Spool.commit` — the same door as an upload: fsync, spool object, signed
   manifest, transfer + deliveries + the dedup record in one journal transaction, publish;
6. only then delete or move the original (a rename, or copy + fsync + verify + unlink across
   file systems), fsync the folders, and drop the dedup record (``after: keep`` keeps it).

A crash between 5 and 6 leaves the original and its dedup record: the next look finds the
record and finishes step 6.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from relayd.config import DropFolderConfig, TenantConfig
from relayd.ingest.rules import Ident, Look, Selector, ident_of, inbox_parts, moved_name, name_problem, same_version
from relayd.journal import DroppedFile, Transfer, new_id
from relayd.spool import CommitRequest, Spool, fsync_dir

__all__ = ["FolderIO", "ScanResult", "Outcome", "scan", "probe", "ingest", "prune", "locate", "DROP_USER"]

log = logging.getLogger("relayd.ingest")

DROP_USER = "dropfolder"
"""The ``user`` of every transfer taken from a drop folder (its ``source`` names the folder)."""

_CHUNK = 1 << 20
_buffers = threading.local()
FAULTS = frozenset(os.environ.get("RELAYD_FAULTS", "").split(","))
"""Fault injection for tests only: ``dropfolder-read-pause`` pauses 1.5s after the first chunk
of each file read (so a test can remove or change it mid-read); ``dropfolder-no-events`` (used by
:mod:`relayd.ingest.dropfolder`) watches without events, by rescans only."""


class _Stopping(Exception):
    """relayd is stopping: abandon the file (nothing was committed)."""


@dataclass(frozen=True)
class FolderIO:
    """What the worker functions need about one watched folder."""

    cfg: DropFolderConfig
    root: str
    """The folder's real path (symlinks resolved when it was watched)."""
    spool: Spool
    stop: threading.Event

    @property
    def source(self) -> str:
        """The ``source`` recorded with its transfers."""
        return f"dropfolder:{self.root}"

    def path(self, rel: str) -> str:
        """Absolute path of ``rel``."""
        return os.path.join(self.root, rel)


@dataclass
class ScanResult:
    """Settle candidates found by a scan, and paths that will not be taken (with the reason)."""

    files: dict[str, Ident] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of one looked-at or taken file.

    ``kind``: ``wait`` (not settled; ``ident`` is the new baseline), ``ready`` (settled, take it),
    ``committed``, ``duplicate`` (committed before; removal finished now), ``changed`` (changed
    while read), ``gone``, ``skipped`` (never taken as is: symlink, special file, bad name) or
    ``failed`` (try again later).
    """

    look: Look
    kind: str
    ident: Ident | None = None
    detail: str = ""
    transfer: Transfer | None = None
    replaced: int | None = None
    """Size of the inbox file the commit replaced (quota to give back)."""
    finalize_error: str | None = None
    """Committed, but the original could not be removed or moved yet (retried later)."""
    original: os.stat_result | None = None
    """For a duplicate: the original as found (what its removal checks against)."""
    sha256: str = ""
    """For a duplicate: the committed SHA-256 (a move across file systems verifies against it)."""


def locate(path: str | Path) -> tuple[str, int, int] | None:
    """Real path, device and inode of folder ``path``; None if it is missing or not a folder."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return os.path.realpath(path), st.st_dev, st.st_ino


# -- scanning ------------------------------------------------------------------------------------

def scan(io: FolderIO, sel: Selector, sub: str = "") -> ScanResult:
    """Walk the folder (or subfolder ``sub``) without following symlinks."""
    out = ScanResult()
    stack = [sub]
    while stack:
        here = stack.pop()
        try:
            it = os.scandir(io.path(here) if here else io.root)
        except FileNotFoundError:
            if not here:
                raise
            continue
        except OSError as exc:
            if not here:
                raise
            out.problems[here] = f"cannot read folder: {exc.strerror or exc}"
            continue
        with it:
            for entry in it:
                if io.stop.is_set():
                    return out
                rel = f"{here}/{entry.name}" if here else entry.name
                if sel.is_temp(entry.name):
                    continue
                try:
                    if entry.is_symlink():
                        if sel.wants(rel) or sel.cfg.recursive:
                            out.problems[rel] = _symlink_problem(io, entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        if sel.descends(rel):
                            stack.append(rel)
                    elif sel.wants(rel):
                        st = entry.stat(follow_symlinks=False)
                        problem = name_problem(rel) or (None if stat.S_ISREG(st.st_mode) else "not a regular file")
                        if problem:
                            out.problems[rel] = problem
                        else:
                            out.files[rel] = ident_of(st)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    out.problems[rel] = f"cannot stat: {exc.strerror or exc}"
    return out


def _symlink_problem(io: FolderIO, path: str) -> str:
    target = os.path.realpath(path)
    if target == io.root or target.startswith(io.root + "/"):
        return "symlink, not followed"
    return "symlink pointing outside the drop folder, not followed"


def prune(io: FolderIO) -> int:
    """Drop dedup records of originals no longer in the folder (left by a crash between their
    removal and the record's); returns how many. Run before the first file of a folder is taken."""
    journal = io.spool.journal
    stale = [rel for rel in journal.dropped_paths(io.root) if not os.path.lexists(io.path(rel))]
    journal.forget_dropped(io.root, stale)
    return len(stale)


# -- looking -------------------------------------------------------------------------------------

def probe(io: FolderIO, looks: Sequence[Look]) -> list[Outcome]:
    """Look at due candidates: not settled (``wait``), ``ready``, or already committed
    (``duplicate``, removal finished here), ``gone``, ``skipped``, ``failed``."""
    out: list[Outcome] = []
    dups: list[tuple[Outcome, os.stat_result, DroppedFile]] = []
    for look in looks:
        path = io.path(look.rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            out.append(Outcome(look, "gone"))
            continue
        except OSError as exc:
            out.append(Outcome(look, "failed", detail=f"cannot stat: {exc.strerror or exc}"))
            continue
        if stat.S_ISLNK(st.st_mode):
            out.append(Outcome(look, "skipped", detail=_symlink_problem(io, path)))
            continue
        if not stat.S_ISREG(st.st_mode):
            out.append(Outcome(look, "skipped", detail="not a regular file"))
            continue
        problem = name_problem(look.rel)
        if problem:
            out.append(Outcome(look, "skipped", detail=problem))
            continue
        ident = ident_of(st)
        if not look.closed and not same_version(look.ident, ident):
            out.append(Outcome(look, "wait", ident))
            continue
        outcome = Outcome(look, "ready", ident)
        try:
            record = _committed_before(io, look.rel, st)
        except OSError as exc:
            outcome = Outcome(look, "failed", ident, detail=f"cannot read: {exc.strerror or exc}")
        else:
            if record is not None:
                outcome = Outcome(look, "duplicate", ident, detail=record.transfer_id)
                dups.append((outcome, st, record))
        out.append(outcome)
    if dups:
        errors = _finalize(io, [(o.look.rel, st, rec.sha256, rec.transfer_id) for o, st, rec in dups])
        for o, _, _ in dups:
            o.finalize_error = errors.get(o.look.rel)
    return out


def _committed_before(io: FolderIO, rel: str, st: os.stat_result, fd: int | None = None) -> DroppedFile | None:
    """The dedup record if this very version of ``rel`` was committed already."""
    rec = io.spool.journal.dropped_file(io.root, rel)
    if rec is None or (rec.size, rec.mtime_ns) != (st.st_size, st.st_mtime_ns):
        return None
    if (rec.inode, rec.ctime_ns) == (st.st_ino, st.st_ctime_ns):
        return rec  # untouched since it was recorded
    own = fd is None
    if fd is None:
        fd = os.open(io.path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        sha, _ = _stream(io, rel, fd, None)
    finally:
        if own:
            os.close(fd)
    return rec if sha == rec.sha256 else None


# -- taking --------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    """A file staged and hashed, ready for the group commit (holds open file descriptors)."""

    look: Look
    st: os.stat_result
    sha: str
    fd: int
    stage_fd: int | None
    staging: Path | None
    req: CommitRequest
    replaced: int | None

    def close(self) -> None:
        """Close the descriptors; remove the staging file unless it was committed."""
        if self.stage_fd is not None:
            os.close(self.stage_fd)
        os.close(self.fd)
        if self.staging is not None:
            _unlink_quiet(self.staging)


def ingest(io: FolderIO, tenant: TenantConfig, items: Sequence[tuple[Look, Ident]]) -> list[Outcome]:
    """Take settled files through the commit door (one group commit for the batch), then
    remove or move their originals."""
    out: list[Outcome | None] = [None] * len(items)
    prepared: list[tuple[int, _Prepared]] = []
    done: list[tuple[int, os.stat_result, str, str]] = []
    try:
        for i, (look, ident) in enumerate(items):
            try:
                if io.stop.is_set():
                    raise _Stopping()
                got = _prepare(io, tenant, look, ident)
            except _Stopping:
                got = Outcome(look, "failed", ident, detail="stopping")
            except OSError as exc:
                got = Outcome(look, "failed", ident, detail=f"{exc.strerror or exc}")
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                log.exception("dropfolder=%s path=%s: unexpected error", io.root, look.rel)
                got = Outcome(look, "failed", ident, detail=f"unexpected error: {exc}")
            if isinstance(got, Outcome):
                out[i] = got
                if got.kind == "duplicate" and got.original is not None:
                    done.append((i, got.original, got.sha256, got.detail))
            else:
                prepared.append((i, got))
        if prepared:
            try:
                results: list[Transfer | Exception] = io.spool.commit_many([p.req for _, p in prepared])
            except OSError as exc:  # a folder fsync after the journal commit: the next look finishes it
                results = [exc] * len(prepared)
            for (i, p), res in zip(prepared, results):
                if isinstance(res, Transfer):
                    p.staging = None  # published
                    out[i] = Outcome(p.look, "committed", ident_of(p.st), transfer=res, replaced=p.replaced)
                    done.append((i, p.st, p.sha, res.id))
                else:
                    detail = res.strerror if isinstance(res, OSError) and res.strerror else str(res)
                    out[i] = Outcome(p.look, "failed", ident_of(p.st), detail=f"commit failed: {detail}")
    finally:
        for _, p in prepared:
            p.close()
    if done:
        errors = _finalize(io, [(items[i][0].rel, st, sha, tid) for i, st, sha, tid in done])
        for i, _, _, _ in done:
            outcome = out[i]
            assert outcome is not None
            outcome.finalize_error = errors.get(items[i][0].rel)
    return [o for o in out if o is not None]


def _prepare(io: FolderIO, tenant: TenantConfig, look: Look, ident: Ident) -> Outcome | _Prepared:
    """Open, check, dedup, stage and hash one file; an :class:`Outcome` if it is not to be
    committed (changed, gone, skipped, already committed)."""
    path = io.path(look.rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return Outcome(look, "gone", ident)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Outcome(look, "skipped", ident, detail=_symlink_problem(io, path))
        return Outcome(look, "failed", ident, detail=f"cannot open: {exc.strerror or exc}")
    staging: Path | None = None
    stage_fd: int | None = None
    keep = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Outcome(look, "skipped", ident, detail="not a regular file")
        if not same_version(ident_of(st), ident):
            return Outcome(look, "changed", ident)
        real = _real_path(fd, path)
        if real != path:
            inside = real.startswith(io.root + "/")
            why = "reached through a symlink" if inside else "resolves outside the drop folder"
            return Outcome(look, "skipped", ident, detail=f"{why}, not taken")
        try:
            record = _committed_before(io, look.rel, st, fd)
        except OSError as exc:
            return Outcome(look, "failed", ident, detail=f"cannot read: {exc.strerror or exc}")
        if record is not None:
            return Outcome(look, "duplicate", ident_of(st), detail=record.transfer_id, original=st,
                           sha256=record.sha256)
        dirs = io.spool.dirs(tenant.name)
        staging, stage_fd, sha, nbytes = _stage(io, look.rel, fd, st, dirs.incoming)
        after = os.fstat(fd)
        if nbytes != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return Outcome(look, "changed", ident, detail="changed while being read")
        try:
            now = os.lstat(path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return Outcome(look, "gone", ident, detail="vanished while being read")
        parts = inbox_parts(io.cfg.into, look.rel)
        vpath = "/" + "/".join(parts)
        publish_to = _inbox_dir(dirs.inbox, parts[:-1]) / parts[-1]
        try:
            old = os.lstat(publish_to)
            replaced = old.st_size if stat.S_ISREG(old.st_mode) else None
        except FileNotFoundError:
            replaced = None
        dropped = DroppedFile(folder=io.root, path=look.rel, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha,
                              inode=st.st_ino, ctime_ns=st.st_ctime_ns)
        req = CommitRequest(tenant=tenant.name, user=DROP_USER, source=io.source, path=vpath, src=staging,
                            publish_to=publish_to, size=st.st_size, sha256=sha,
                            fd=stage_fd if stage_fd is not None else fd,
                            destinations=tenant.destinations_for(vpath), dropped=dropped)
        keep = True
        return _Prepared(look=look, st=st, sha=sha, fd=fd, stage_fd=stage_fd, staging=staging, req=req,
                         replaced=replaced)
    finally:
        if not keep:
            if stage_fd is not None:
                os.close(stage_fd)
            if staging is not None:
                _unlink_quiet(staging)
            os.close(fd)


def _real_path(fd: int, fallback: str) -> str:
    """Where the open file ``fd`` really is (``/proc/self/fd``), else the resolved ``fallback``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


def _stage(io: FolderIO, rel: str, fd: int, st: os.stat_result,
           incoming: Path) -> tuple[Path, int | None, str, int]:
    """Put the file into ``incoming``: a hard link (same file system, original deleted after) or a
    verified copy. Returns (staging path, its fd for a copy or None, SHA-256, bytes read)."""
    staging = incoming / new_id()
    if io.cfg.after == "delete":
        try:
            os.link(io.path(rel), staging, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
        else:
            try:
                if os.lstat(staging).st_ino != st.st_ino:
                    raise FileNotFoundError(errno.ENOENT, "replaced while being linked")
                sha, nbytes = _stream(io, rel, fd, None)
            except BaseException:
                _unlink_quiet(staging)
                raise
            return staging, None, sha, nbytes
    out = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        sha, nbytes = _stream(io, rel, fd, out)
        if _stream(io, rel, out, None, original=False)[0] != sha:
            raise OSError(errno.EIO, "copy does not match the original (digest verification failed)")
    except BaseException:
        os.close(out)
        _unlink_quiet(staging)
        raise
    return staging, out, sha, nbytes


def _stream(io: FolderIO, rel: str, fd: int, out: int | None, original: bool = True) -> tuple[str, int]:
    """SHA-256 and length of the file at ``fd`` (from offset 0), copied to ``out`` if given.
    ``original``: ``fd`` is the dropped file (not a copy of it being verified)."""
    h = hashlib.sha256()
    buf = getattr(_buffers, "buf", None)
    if buf is None:  # one per worker thread: no 1 MiB allocation per small file
        buf = _buffers.buf = bytearray(_CHUNK)
    view = memoryview(buf)
    pos = 0
    while True:
        if io.stop.is_set():
            raise _Stopping()
        n = os.preadv(fd, [buf], pos)
        if not n:
            break
        h.update(view[:n])
        if out is not None:
            written = 0
            while written < n:
                written += os.pwrite(out, view[written:n], pos + written)
        if pos == 0 and original and "dropfolder-read-pause" in FAULTS:
            log.warning("fault dropfolder-read-pause: paused reading dropfolder=%s path=%s", io.root, rel)
            time.sleep(1.5)
        pos += n
    return h.hexdigest(), pos


def _inbox_dir(inbox: Path, parts: Sequence[str]) -> Path:
    """Create the inbox folders ``parts`` (never through a symlink); return the deepest."""
    here = inbox
    for name in parts:
        here = here / name
        try:
            os.mkdir(here, 0o750)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, f"inbox path {name!r} is taken by a file") from None
    return here


# -- removing the original -----------------------------------------------------------------------

def _finalize(io: FolderIO, items: Sequence[tuple[str, os.stat_result, str, str]]) -> dict[str, str]:
    """Delete or move committed originals (``after: keep``: nothing); errors by path."""
    if io.cfg.after == "keep":
        return {}
    errors: dict[str, str] = {}
    gone: list[str] = []
    dirs: set[str] = set()
    for rel, st, sha, tid in items:
        path = io.path(rel)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            gone.append(rel)
            continue
        except OSError as exc:
            errors[rel] = f"cannot stat the original: {exc.strerror or exc}"
            continue
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_dev, st.st_ino, st.st_size,
                                                                       st.st_mtime_ns):
            errors[rel] = "the original changed after its commit; left in place, it will be taken again"
            if io.cfg.after == "delete" and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                log.error("dropfolder=%s path=%s: written to after it settled and was committed as transfer=%s; "
                          "the spool object is a hard link to it and may no longer match its digest (a writer "
                          "pausing longer than settle?)", io.root, rel, tid)
            continue
        try:
            if io.cfg.after == "move":
                assert io.cfg.move_to is not None
                _move(io, rel, st, sha, tid, io.cfg.move_to)
            else:
                os.unlink(path)
        except OSError as exc:
            errors[rel] = f"cannot {io.cfg.after} the original: {exc.strerror or exc}"
            continue
        gone.append(rel)
        dirs.add(os.path.dirname(path))
    for d in dirs:
        try:
            fsync_dir(d)
        except OSError as exc:
            log.warning("dropfolder=%s: cannot fsync %s: %s", io.root, d, exc.strerror or exc)
    io.spool.journal.forget_dropped(io.root, gone)
    return errors


def _move(io: FolderIO, rel: str, st: os.stat_result, sha: str, tid: str, target: Path) -> None:
    """Move the original to ``target/rel`` (``.<transfer id>`` appended if taken): a hard link
    and unlink on the same file system, else copy, fsync, verify the digest, then unlink."""
    parts = rel.split("/")
    folder = _inbox_dir(target, parts[:-1])
    dest = folder / parts[-1]
    if os.path.lexists(dest):
        dest = folder / moved_name(parts[-1], tid)
    src = io.path(rel)
    if os.stat(folder).st_dev == st.st_dev:
        try:
            os.link(src, dest, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
            os.rename(src, dest)  # protected_hardlinks: rename needs no ownership
        else:
            os.unlink(src)
        fsync_dir(folder)
        return
    tmp = folder / f".{parts[-1]}.{tid}.relayd-tmp"
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            got, _ = _stream(io, rel, fd, out)
            os.fsync(out)
            if got != sha or _stream(io, rel, out, None, original=False)[0] != sha:
                raise OSError(errno.EIO, "moved copy does not match the committed digest")
            os.link(tmp, dest, follow_symlinks=False)  # never replaces an existing name
        finally:
            os.close(out)
            _unlink_quiet(tmp)
    finally:
        os.close(fd)
    fsync_dir(folder)
    os.unlink(src)


def _unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
