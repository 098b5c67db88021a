"""Watched drop folders: settled files become commits, exactly once (docs/dropfolders.md).

One :class:`DropFolders` per daemon. For each folder a watchdog (inotify) watch feeds events into
a :class:`~relayd.ingest.rules.Tracker` on the event loop; due candidates are looked at, and
settled ones taken, in a small pool of worker threads (:mod:`relayd.ingest.worker`) — never on
the loop, which serves SFTP sessions: files can be big and folders can be network mounts. A full
rescan every ``rescan`` seconds (and at start, after an event overflow, when a folder comes back)
catches whatever events missed. Quota is reserved on the loop before a file is taken, as for an
upload; a refused file stays where it is and is tried again later.

A folder that disappears (or is replaced) raises an ``ALERT`` log line; its presence is checked
every :data:`PRESENCE_EVERY` seconds and it is watched again when it is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

from relayd.config import Config, DropFolderConfig
from relayd.gateway.quota import QuotaExceeded, TenantUsage
from relayd.ingest import worker
from relayd.ingest.rules import Ident, Look, Selector, Tracker
from relayd.ingest.watch import Watcher
from relayd.ingest.worker import FolderIO, Outcome, ScanResult
from relayd.spool import Spool

__all__ = ["DropFolders", "WORKERS", "PRESENCE_EVERY"]

log = logging.getLogger("relayd.ingest")

WORKERS = 6
"""Threads doing drop-folder I/O (scans, looks, takes)."""
BATCHES = 4
"""Batches of files being taken at once. Each is one group commit (:meth:`relayd.spool.Spool.commit_many`:
one journal transaction, one fsync per folder), then the removal of its originals."""
BATCH = 64
"""Files per batch at most."""
PROBE_BATCH = 512
PRESENCE_EVERY = 1.0
"""Seconds between checks that each folder is still there (and is still the same folder)."""

T = TypeVar("T")


class _Folder:
    """Runtime state of one configured drop folder (event-loop thread only)."""

    def __init__(self, cfg: DropFolderConfig):
        self.cfg = cfg
        self.sel = Selector(cfg)
        self.tracker = Tracker(cfg.settle)
        self.io: FolderIO | None = None
        self.root_id: tuple[int, int] | None = None
        self.state = "starting"  # starting | watching | missing | stopped
        self.watch: Any = None
        self.token = object()
        """Changes with every (re)activation: events and results of an older watch are dropped."""
        self.primed = False
        self.kept: dict[str, Ident] = {}
        """after: keep — originals already taken, as they were (skipped by rescans while unchanged)."""
        self.warned: dict[str, str] = {}
        self.ready: deque[tuple[Look, Ident]] = deque()
        self.rescan_at = 0.0
        self.presence_at = 0.0
        self.scanning = self.probing = self.checking = False
        self.subscans: set[str] = set()
        self.prune_soon = False

    @property
    def name(self) -> str:
        return str(self.cfg.path)

    def rel(self, path: str) -> str | None:
        """``path`` relative to the watched root, or None if it is not below it."""
        assert self.io is not None
        root = self.io.root + "/"
        return path[len(root):] if path.startswith(root) else None


class DropFolders:
    """All drop folders of the daemon: start, reload (:meth:`update_config`), stop."""

    def __init__(self, config: Config, spool: Spool, usage_of: Callable[[str], TenantUsage],
                 on_commit: Callable[[], None] | None = None):
        self.config = config
        self.spool = spool
        self._usage_of = usage_of
        self._on_commit = on_commit
        self._folders: dict[Path, _Folder] = {}
        self._events: deque[tuple[object, str, str, str]] = deque()
        self._signaled = False
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._taking: set[asyncio.Task[Any]] = set()
        """Tasks committing a batch: the only ones :meth:`stop` waits for."""
        self._claimed: set[tuple[str, str]] = set()
        self._batches = 0
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="relayd-ingest")
        self._watcher = Watcher()
        self._main: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin watching every configured folder (in the background; returns at once)."""
        self._loop = asyncio.get_running_loop()
        noisy = logging.getLogger("watchdog")  # a debug line per inotify event otherwise
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.INFO)
        for cfg in self.config.dropfolders:
            self._add(cfg)
        self._main = asyncio.ensure_future(self._run())
        self._main.add_done_callback(_report_crash)
        if self.config.dropfolders:
            log.info("dropfolders: watching %d folder(s)", len(self.config.dropfolders))

    def update_config(self, config: Config) -> None:
        """Apply a reloaded config: new folders are watched, removed ones dropped, changed ones
        re-read (quota and routes come from the current config at each commit anyway)."""
        self.config = config
        want = {d.path: d for d in config.dropfolders}
        for path, f in list(self._folders.items()):
            if want.get(path) != f.cfg:
                self._drop(f, "removed from the config" if path not in want else "settings changed")
                del self._folders[path]
        for path, d in want.items():
            if path not in self._folders:
                self._add(d)
        self._wake.set()

    @property
    def watched(self) -> set[Path]:
        """Configured folder paths currently known (watched, or missing and awaited)."""
        return set(self._folders)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop watching; let batches being taken finish (each file is committed whole or not at
        all), up to ``grace`` seconds; then stop the worker threads."""
        self._stop.set()
        self._wake.set()
        if self._main is not None:
            # The loop ends on the stop flag: a cancel alone can be lost in asyncio.wait_for when
            # the wake-up fires at the same moment (CPython gh-86296), so it is only the fallback.
            await asyncio.wait([self._main], timeout=5)
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        if self._taking:
            await asyncio.wait(list(self._taking), timeout=grace)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._watcher.close()
        # Workers see the stop flag between files and chunks: they end promptly.
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))
        if self._folders:
            log.info("dropfolders: stopped")

    def _add(self, cfg: DropFolderConfig) -> None:
        self._folders[cfg.path] = _Folder(cfg)
        self._wake.set()

    def _drop(self, f: _Folder, why: str) -> None:
        f.state = "stopped"
        f.tracker.clear()
        f.ready.clear()
        if f.watch is not None:
            self._spawn(self._unwatch(f.watch))
            f.watch = None
        log.info("dropfolder=%s: no longer watched (%s)", f.name, why)

    # -- plumbing --------------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` in a drop-folder worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def _spawn(self, coro: Coroutine[Any, Any, Any], taking: bool = False) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        if taking:
            self._taking.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            self._taking.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("dropfolders: internal error: %r", t.exception(), exc_info=t.exception())
            self._wake.set()
        task.add_done_callback(done)

    def _push(self, token: object, kind: str, src: str, dest: str) -> None:
        """Called in the observer thread for every event: queue it, wake the loop once."""
        self._events.append((token, kind, src, dest))
        if not self._signaled and self._loop is not None:
            self._signaled = True
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # loop closed while stopping
                pass

    async def _watch(self, f: _Folder) -> None:
        assert f.io is not None
        if "dropfolder-no-events" in worker.FAULTS:
            return
        try:
            f.watch = await self._watcher.add(f.io.root, f.cfg.recursive, self._push, f.token)
        except OSError as exc:
            log.error("dropfolder=%s: cannot watch for events (%s); relying on a rescan every %.0fs",
                      f.name, exc.strerror or exc, f.cfg.rescan)

    async def _unwatch(self, watch: Any) -> None:
        await self._watcher.remove(watch)

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._signaled = False
            now = time.monotonic()
            self._drain(now)
            for f in list(self._folders.values()):
                self._maintain(f, now)
            self._dispatch(now)
            try:
                await asyncio.wait_for(self._wake.wait(), self._delay(now))
            except asyncio.TimeoutError:
                pass

    def _delay(self, now: float) -> float:
        soonest = now + PRESENCE_EVERY
        for f in self._folders.values():
            soonest = min(soonest, f.presence_at)
            if f.state == "watching" and f.primed:
                soonest = min(soonest, f.rescan_at)
                if not f.probing:
                    due = f.tracker.next_due()
                    if due is not None:
                        soonest = min(soonest, due)
        return max(0.01, soonest - now)

    def _maintain(self, f: _Folder, now: float) -> None:
        if f.state == "stopped":
            return
        if now >= f.presence_at and not f.checking:
            f.checking = True
            f.presence_at = now + PRESENCE_EVERY
            self._spawn(self._presence(f))
        if f.state != "watching" or f.scanning:
            return
        if f.primed and now >= f.rescan_at:
            f.scanning = True
            self._spawn(self._scan(f, ""))
        elif f.subscans:
            sub = f.subscans.pop()
            f.scanning = True
            self._spawn(self._scan(f, sub))
        elif f.prune_soon:
            f.prune_soon = False
            assert f.io is not None
            self._spawn(self._io(worker.prune, f.io))

    async def _presence(self, f: _Folder) -> None:
        try:
            where = await self._io(worker.locate, f.cfg.path)
            if f.state == "stopped":
                return
            if f.state == "watching":
                assert f.io is not None
                if where is not None and (where[0], where[1:]) == (f.io.root, f.root_id):
                    return
                await self._lost(f, "disappeared" if where is None else "was replaced by another folder")
                if where is None:
                    return
            if where is None:
                if f.state == "starting":
                    f.state = "missing"
                    log.error("ALERT dropfolder=%s does not exist; files dropped there wait until it does "
                              "(checked every %.0fs)", f.name, PRESENCE_EVERY)
                return
            if f.state == "missing":
                log.warning("dropfolder=%s is back; watching it again", f.name)
            await self._activate(f, where)
        finally:
            f.checking = False

    async def _activate(self, f: _Folder, where: tuple[str, int, int]) -> None:
        real, dev, ino = where
        f.io = FolderIO(cfg=f.cfg, root=real, spool=self.spool, stop=self._stop)
        f.root_id = (dev, ino)
        f.token = object()
        f.primed = False
        f.state = "watching"
        await self._watch(f)
        log.info("dropfolder=%s: watching%s for tenant %s (pattern %s, settle %gs, after %s, rescan every %gs)",
                 f.name, "" if real == f.name else f" (real path {real})", f.cfg.tenant, f.cfg.pattern,
                 f.cfg.settle, f.cfg.after + (f":{f.cfg.move_to}" if f.cfg.move_to else ""), f.cfg.rescan)
        f.scanning = True
        self._spawn(self._scan(f, ""))

    async def _lost(self, f: _Folder, why: str) -> None:
        log.error("ALERT dropfolder=%s %s; files dropped there wait until it is back (checked every %.0fs)",
                  f.name, why, PRESENCE_EVERY)
        f.state = "missing"
        f.token = object()
        f.primed = False
        f.tracker.clear()
        f.ready.clear()
        f.kept.clear()
        f.subscans.clear()
        if f.watch is not None:
            watch, f.watch = f.watch, None
            await self._unwatch(watch)

    # -- events and scans ------------------------------------------------------------------------

    def _drain(self, now: float) -> None:
        if not self._events:
            return
        live = {f.token: f for f in self._folders.values() if f.state == "watching"}
        while self._events:
            token, kind, src, dest = self._events.popleft()
            f = live.get(token)
            if f is not None:
                self._on_event(f, kind, src, dest, now)

    def _on_event(self, f: _Folder, kind: str, src: str, dest: str, now: float) -> None:
        assert f.io is not None
        if kind == "lost":
            log.warning("dropfolder=%s: events were lost (kernel queue overflow); rescanning", f.name)
            f.rescan_at = 0.0
            return
        if kind == "dir_deleted" and src == f.io.root:
            f.presence_at = 0.0
            return
        srel = f.rel(src) if src else None
        drel = f.rel(dest) if dest else None
        if kind in ("created", "modified", "closed"):
            if srel and f.sel.wants(srel):
                f.kept.pop(srel, None)
                f.tracker.event(srel, now, closed=kind == "closed")
        elif kind in ("deleted", "moved"):
            if srel:
                self._gone(f, srel)
            if drel and f.sel.wants(drel):
                f.kept.pop(drel, None)
                f.tracker.event(drel, now, closed=True)  # renamed into its name: written
        elif kind in ("dir_moved", "dir_deleted"):
            if srel:
                f.tracker.forget_under(srel)
                for rel in [r for r in f.kept if r.startswith(srel + "/")]:
                    self._gone(f, rel)
            if drel and f.sel.descends(drel):
                f.subscans.add(drel)
        elif kind == "dir_created" and srel and f.sel.descends(srel):
            f.subscans.add(srel)

    def _gone(self, f: _Folder, rel: str) -> None:
        f.tracker.forget(rel)
        f.warned.pop(rel, None)
        if f.kept.pop(rel, None) is not None:
            f.prune_soon = True  # its dedup record goes too: the same file dropped again is new

    async def _scan(self, f: _Folder, sub: str) -> None:
        assert f.io is not None
        token, io, started = f.token, f.io, time.monotonic()
        try:
            if sub:
                result = await self._io(worker.scan, io, f.sel, sub)
            else:
                result = await self._io(_prune_and_scan, io, f.sel)
        except OSError as exc:
            log.warning("dropfolder=%s: cannot scan: %s", f.name, exc.strerror or exc)
            f.presence_at = 0.0
            return
        finally:
            f.scanning = False
        if f.token is not token or f.state != "watching":
            return
        self._merge(f, result, full=not sub, started=started)

    def _merge(self, f: _Folder, result: ScanResult, full: bool, started: float) -> None:
        assert f.io is not None
        now = time.monotonic()
        for rel, ident in result.files.items():
            if (f.io.root, rel) in self._claimed or f.kept.get(rel) == ident:
                continue
            f.kept.pop(rel, None)
            f.tracker.observe(rel, ident, now)
        for rel, why in result.problems.items():
            self._warn(f, rel, why)
        if full:
            for rel in f.tracker:
                c = f.tracker.get(rel)
                if rel not in result.files and c is not None and not c.busy and c.since < started:
                    f.tracker.forget(rel)
            for rel in [r for r in f.kept if r not in result.files]:
                del f.kept[rel]
            for rel in [r for r in f.warned if r not in result.problems and r not in f.tracker]:
                del f.warned[rel]
            f.rescan_at = now + f.cfg.rescan
            if not f.primed:
                f.primed = True
                log.debug("dropfolder=%s: first scan found %d file(s)", f.name, len(result.files))

    def _warn(self, f: _Folder, rel: str, message: str) -> None:
        """Log a problem with ``rel`` once (again only when it changes)."""
        if f.warned.get(rel) != message:
            f.warned[rel] = message
            log.warning("dropfolder=%s path=%s: %s", f.name, rel, message)
        else:
            log.debug("dropfolder=%s path=%s: %s", f.name, rel, message)

    # -- looking and taking ----------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        for f in self._folders.values():
            if f.state == "watching" and f.primed and not f.probing:
                looks = f.tracker.due(now, PROBE_BATCH)
                if looks:
                    f.probing = True
                    self._spawn(self._probe(f, looks))
        busy = True
        while busy and self._batches < BATCHES:
            busy = False
            for f in self._folders.values():
                if self._batches >= BATCHES:
                    break
                if f.ready and f.state == "watching":
                    items = self._reserve(f, now)
                    if items:
                        self._batches += 1
                        self._spawn(self._ingest(f, items), taking=True)
                        busy = True

    async def _probe(self, f: _Folder, looks: list[Look]) -> None:
        assert f.io is not None
        token = f.token
        try:
            outcomes = await self._io(worker.probe, f.io, looks)
        finally:
            f.probing = False
        if f.token is not token:
            return
        now = time.monotonic()
        for o in outcomes:
            c = f.tracker.get(o.look.rel)
            if o.kind == "wait":
                assert o.ident is not None
                f.tracker.baseline(o.look, o.ident, now)
            elif o.kind == "ready":
                assert o.ident is not None
                if c is not None and c.gen == o.look.gen:
                    f.ready.append((o.look, o.ident))
                else:
                    f.tracker.release(o.look)
            else:
                self._outcome(f, o, now)

    def _reserve(self, f: _Folder, now: float) -> list[tuple[Look, Ident]]:
        """Up to :data:`BATCH` ready files of ``f`` with their quota reserved (as an upload would)."""
        assert f.io is not None
        tenant = self.config.tenants[f.cfg.tenant]
        usage = self._usage_of(tenant.name)
        out: list[tuple[Look, Ident]] = []
        while f.ready and len(out) < BATCH:
            look, ident = f.ready.popleft()
            c = f.tracker.get(look.rel)
            if c is None or c.gen != look.gen:  # an event since it was found settled: look again
                f.tracker.release(look)
                continue
            key = (f.io.root, look.rel)
            if key in self._claimed:
                f.tracker.retry(look, now, 1.0)
                continue
            try:
                if tenant.max_file_size is not None and ident[0] > tenant.max_file_size:
                    raise QuotaExceeded(f"larger than the tenant's max_file_size ({tenant.max_file_size} bytes)")
                usage.reserve_file(tenant.quota.files)
                try:
                    usage.reserve_bytes(ident[0], tenant.quota.bytes)
                except QuotaExceeded:
                    usage.release(0, 1)
                    raise
            except QuotaExceeded as exc:
                f.tracker.retry(look, now, f.cfg.rescan)
                self._warn(f, look.rel, f"not taken yet: {exc}; it stays and is tried again")
                continue
            self._claimed.add(key)
            out.append((look, ident))
        return out

    async def _ingest(self, f: _Folder, items: list[tuple[Look, Ident]]) -> None:
        assert f.io is not None
        io, token = f.io, f.token
        tenant = self.config.tenants[f.cfg.tenant]
        try:
            outcomes = await self._io(worker.ingest, io, tenant, items)
        except Exception as exc:  # noqa: BLE001 - reported per file, retried
            outcomes = [Outcome(look, "failed", ident, detail=f"internal error: {exc}") for look, ident in items]
        finally:
            self._batches -= 1
            for look, _ in items:
                self._claimed.discard((io.root, look.rel))
        usage = self._usage_of(tenant.name)
        now = time.monotonic()
        wake = False
        for (look, ident), o in zip(items, outcomes):
            if o.kind == "committed":
                assert o.transfer is not None
                log.info("dropfolder=%s path=%s committed transfer=%s size=%d", f.name, look.rel, o.transfer.id,
                         o.transfer.size)
                if o.replaced is not None:
                    usage.release(o.replaced, 1)
                wake = wake or bool(tenant.destinations_for(o.transfer.path))
            else:
                usage.release(ident[0], 1)
            if f.token is token:
                self._outcome(f, o, now)
        if wake and self._on_commit is not None:
            self._on_commit()

    def _outcome(self, f: _Folder, o: Outcome, now: float) -> None:
        """Bring the tracker up to date with what became of a file."""
        rel = o.look.rel
        if o.kind in ("committed", "duplicate"):
            if o.kind == "duplicate":
                log.info("dropfolder=%s path=%s: already committed as transfer=%s; not taken again", f.name, rel,
                         o.detail)
            if o.finalize_error:
                self._warn(f, rel, o.finalize_error)
                f.tracker.retry(o.look, now, f.cfg.rescan)
                return
            f.warned.pop(rel, None)
            if f.tracker.finished(o.look) and f.cfg.after == "keep" and o.ident is not None:
                f.kept[rel] = o.ident
        elif o.kind == "changed":
            log.info("dropfolder=%s path=%s: changed while being taken; waiting for it to settle", f.name, rel)
            f.tracker.restart(o.look, now)
        elif o.kind == "gone":
            if o.detail:
                log.warning("dropfolder=%s path=%s: %s; skipped", f.name, rel, o.detail)
            f.warned.pop(rel, None)
            f.tracker.finished(o.look)
        elif o.kind == "skipped":
            self._warn(f, rel, o.detail)
            f.tracker.finished(o.look)
        else:
            if o.detail != "stopping":
                self._warn(f, rel, f"{o.detail}; skipped, tried again later")
            f.tracker.retry(o.look, now, f.cfg.rescan)


def _prune_and_scan(io: FolderIO, sel: Selector) -> ScanResult:
    """A full scan, after dropping dedup records of originals that are gone."""
    pruned = worker.prune(io)
    if pruned:
        log.info("dropfolder=%s: dropped %d stale dedup record(s)", io.root, pruned)
    return worker.scan(io, sel)


def _report_crash(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("dropfolder loop crashed: %r", task.exception(), exc_info=task.exception())
