"""Daemon lifecycle: build services from config, run, reload on SIGHUP, drain on SIGTERM.

Start order: pid file lock → journal → recovery (spool, then deliveries left ``sending``) →
relay → drop folders → listeners → metrics endpoint → ``READY=1``. Stop order (SIGTERM/SIGINT): ``STOPPING=1``
→ listeners closed and the relay claims nothing new → uploads in progress may finish until
``gateway.drain_timeout`` → remaining connections closed → drop folders stop (files being
taken are committed whole or not at all) → delivery attempts still running get
what is left of that time, then are cancelled and checkpointed as ``pending`` (they resume from
their temp file at the next start) → metrics endpoint and journal closed → exit 0.
Signal handlers only set events; all work is ordinary async code. systemd is told about every
state change over ``NOTIFY_SOCKET`` (:func:`sd_notify`; no libsystemd needed).
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import asyncssh

from relayd.config import Config, ConfigError, load_config
from relayd.gateway.context import GatewayContext
from relayd.gateway.server import load_host_keys, start_listeners
from relayd.ingest import DropFolders, check_dropfolders
from relayd.integrity import KeyRing, Notary, SigningKeyError
from relayd.journal import Journal, JournalError
from relayd.metrics import Metrics, QueueSnapshot
from relayd.relay.scheduler import Relay
from relayd.spool import Spool

__all__ = ["Daemon", "DaemonError", "run", "journal_path", "pid_path", "running_pid", "sd_notify"]

log = logging.getLogger("relayd.daemon")


class DaemonError(Exception):
    """The daemon cannot start (e.g. another one runs with the same state_dir)."""

    exit_code = 1


def make_notary(cfg: Config) -> Notary | None:
    """The manifest signer for ``cfg`` (the key is created on first use); None if manifests are off."""
    if not cfg.integrity.manifests:
        return None
    ring = KeyRing.open(cfg.node.state_dir)
    return Notary(ring, cfg.node.id, cfg.integrity.digests)


def journal_path(config: Config) -> Path:
    """Where the SQLite journal of this config lives."""
    return config.node.state_dir / "journal.db"


def pid_path(config: Config) -> Path:
    """The pid file of the daemon of this config (locked while it runs)."""
    return config.node.state_dir / "relayd.pid"


def sd_notify(message: str) -> None:
    """Send a state line to systemd's ``NOTIFY_SOCKET`` if there is one (no systemd dependency)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def _watchdog_usec() -> int:
    """systemd's watchdog interval for this process (µs), 0 if none is armed."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    try:
        return max(0, int(os.environ.get("WATCHDOG_USEC", "0") or 0))
    except ValueError:
        return 0


class PidFile:
    """``state_dir/relayd.pid``, holding the daemon's pid under an exclusive ``flock`` while it runs.

    The lock (not the file's existence) says whether a daemon runs, so a pid file left behind by
    ``kill -9`` never blocks a start, and two daemons never share one state_dir.
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> "PidFile":
        """Lock and write the pid file; :class:`DaemonError` if another daemon holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonError(f"another relayd (pid {other}) is running with node.state_dir {path.parent}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file and drop the lock."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)


def running_pid(path: Path) -> int | None:
    """The pid of the daemon holding the pid file at ``path``, or None if none runs.

    Raises OSError if the file exists but cannot be read (e.g. permissions).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class _ScrapeJournal:
    """A read-only journal connection of the metrics scrape thread (never the daemon's own)."""

    def __init__(self, path: Path, configured: Callable[[], Iterable[str]]):
        self._path = path
        self._configured = configured
        self._journal: Journal | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> QueueSnapshot:
        with self._lock:
            if self._journal is None:
                self._journal = Journal.open(self._path, readonly=True)
            stats = self._journal.queue_stats()
        oldest = stats.oldest_waiting
        created = None
        if oldest is not None:
            created = datetime.fromisoformat(oldest.created_at.replace("Z", "+00:00")).timestamp()
        return QueueSnapshot(stats.by_destination, created, tuple(self._configured()))

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Daemon:
    """One running gateway process."""

    def __init__(self, config: Config, config_path: Path):
        self.config = config
        self.config_path = config_path
        self.stop_event = asyncio.Event()
        self.reload_event = asyncio.Event()
        self.relay: Relay | None = None
        self.ingest: DropFolders | None = None
        self.metrics: Metrics | None = None
        self.metrics_note = ""
        """Appended to the STATUS= line (e.g. when the metrics address could not be bound)."""

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain, stop. Returns the exit code."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig, event in ((signal.SIGTERM, self.stop_event), (signal.SIGINT, self.stop_event),
                           (signal.SIGHUP, self.reload_event)):
            loop.add_signal_handler(sig, event.set)
        check_dropfolders(cfg)  # a missing drop folder is a config error (exit 2) before anything starts
        for d in (cfg.node.state_dir, cfg.node.spool_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        pidfile = PidFile.acquire(pid_path(cfg))
        try:
            return await self._run(cfg)
        finally:
            pidfile.release()

    async def _run(self, cfg: Config) -> int:
        sd_notify("STATUS=starting: journal and crash recovery")
        journal = Journal.open(journal_path(cfg))
        metrics = self.metrics = Metrics(cfg.node.id)
        spool = Spool(cfg.node.spool_dir, journal, make_notary(cfg))
        spool.metrics = metrics
        spool.recover(cfg.tenants)
        ctx = GatewayContext(config=cfg, spool=spool, metrics=metrics)
        ctx.prepare_tenants()
        relay = Relay(cfg, journal, spool, metrics=metrics)
        ctx.on_commit = relay.wake
        relay_task = asyncio.ensure_future(relay.run())
        relay_task.add_done_callback(_report_crash)
        self.relay = relay
        # READY only after recovery: deliveries left `sending` by a crash are pending again.
        recovered = asyncio.ensure_future(relay.recovered.wait())
        await asyncio.wait([recovered, relay_task], return_when=asyncio.FIRST_COMPLETED)
        recovered.cancel()
        ingest = self.ingest = DropFolders(cfg, spool, usage_of=ctx.usage_of, on_commit=relay.wake)
        await ingest.start()
        host_keys = load_host_keys(cfg)
        acceptors = await start_listeners(ctx, host_keys)
        scrape = _ScrapeJournal(journal_path(cfg), lambda: list(ctx.config.destinations))
        self._start_metrics(metrics, ctx, scrape)
        # Everything allocated so far lives for the whole run: keep the cyclic GC off it, and
        # collect less often (the hot path allocates many short-lived, acyclic objects).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        log.info("relayd ready node=%s tenants=%d pid=%d", cfg.node.id, len(cfg.tenants), os.getpid(),
                 extra={"event.action": "start", "event.outcome": "success"})
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\n{await self._status(ctx)}")
        housekeeping = asyncio.ensure_future(self._housekeeping(ctx))
        try:
            while not self.stop_event.is_set():
                waiters = [asyncio.ensure_future(self.stop_event.wait()),
                           asyncio.ensure_future(self.reload_event.wait())]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if self.reload_event.is_set() and not self.stop_event.is_set():
                    self.reload_event.clear()
                    await self._reload(ctx)
        finally:
            housekeeping.cancel()
            grace = ctx.config.gateway.drain_timeout
            deadline = time.monotonic() + grace
            sd_notify(f"STOPPING=1\nSTATUS=draining: {len(ctx.uploads)} upload(s) in progress, "
                      f"{relay.in_flight} delivery attempt(s) in flight, up to {grace:.0f}s")
            log.info("stopping: listeners closed, draining for up to %.0fs", grace,
                     extra={"event.action": "stop", "event.outcome": "unknown"})
            relay.quiesce()
            for acceptor in acceptors:
                acceptor.close()
            await self._drain(ctx, deadline)
            await ingest.stop(grace=max(1.0, deadline - time.monotonic()))
            await relay.stop(grace=max(1.0, deadline - time.monotonic()))
            relay_task.cancel()
            await asyncio.gather(relay_task, return_exceptions=True)
            metrics.close()
            scrape.close()
            journal.close()
            log.info("stopped", extra={"event.action": "stop", "event.outcome": "success"})
        return 0

    def _start_metrics(self, metrics: Metrics, ctx: GatewayContext, scrape: _ScrapeJournal) -> None:
        """Wire the gauges read at scrape time and start the HTTP endpoint (if enabled)."""
        metrics.connections_active.set_function(lambda: len(ctx.connections))
        metrics.sessions_active.set_function(lambda: sum(list(ctx.sessions.values())))
        metrics.uploads_active.set_function(lambda: len(ctx.uploads))
        metrics.watch_queue(scrape.snapshot)
        mc = ctx.config.metrics
        if not mc.enabled:
            log.info("metrics endpoint disabled (metrics.enabled: false)")
            return
        where = _hostport(*mc.listen)
        try:
            metrics.serve(*mc.listen)
        except OSError as exc:
            self.metrics_note = f"; metrics endpoint {where} unavailable"
            log.error("metrics: cannot listen on %s: %s; serving transfers without metrics", where,
                      exc.strerror or exc)
            return
        log.info("metrics on http://%s/metrics", where)

    async def _status(self, ctx: GatewayContext) -> str:
        """The ``STATUS=`` line: sessions, uploads, the delivery queue."""
        sessions = sum(ctx.sessions.values())
        text = (f"STATUS=serving: {sessions} session(s), {len(ctx.connections)} connection(s), "
                f"{len(ctx.uploads)} upload(s) in progress")
        try:
            stats = await asyncio.get_running_loop().run_in_executor(None, ctx.spool.journal.queue_stats)
        except JournalError:
            return text + "; queue unknown" + self.metrics_note
        counts = {s: sum(v.get(s, 0) for v in stats.by_destination.values())
                  for s in ("pending", "retry_wait", "sending", "failed")}
        return (text + f"; queue: {counts['pending']} pending, {counts['retry_wait']} retrying, "
                f"{counts['sending']} sending, {counts['failed']} failed" + self.metrics_note)

    async def _housekeeping(self, ctx: GatewayContext) -> None:
        """Watchdog pings, the status line, the idle-session sweep and retention purges."""
        watchdog_usec = _watchdog_usec()
        last_purge = 0.0
        purge: asyncio.Future[None] | None = None
        while True:
            interval = 5.0
            if watchdog_usec:
                interval = min(interval, watchdog_usec / 2e6)
            if ctx.config.gateway.idle_timeout:
                interval = min(interval, max(0.2, ctx.config.gateway.idle_timeout / 4))
            await asyncio.sleep(interval)
            if watchdog_usec:  # first, so slow work below can't make it late
                sd_notify("WATCHDOG=1")
            now = time.monotonic()
            idle_limit = ctx.config.gateway.idle_timeout
            for conn, gw_conn in list(ctx.connections.items()):
                if idle_limit and gw_conn.idle_for(now) > idle_limit:
                    log.info("closing idle connection conn=%s after %.0fs", gw_conn.conn_id, idle_limit)
                    conn.disconnect(asyncssh.DISC_BY_APPLICATION, "Idle timeout")
            retentions = [t.retention for t in ctx.config.tenants.values()]
            if (retentions and now - last_purge >= min(60.0, max(1.0, min(retentions)))
                    and (purge is None or purge.done())):
                last_purge = now
                purge = asyncio.ensure_future(self._purge(ctx))
            sd_notify(await self._status(ctx))

    async def _purge(self, ctx: GatewayContext) -> None:
        """Spool retention: purge objects whose deliveries all ended ``retention`` ago."""
        loop = asyncio.get_running_loop()
        for tenant in ctx.config.tenants.values():
            try:
                _, nbytes, files = await loop.run_in_executor(None, ctx.spool.purge, tenant.name, tenant.retention)
            except (OSError, JournalError) as exc:
                log.error("retention purge failed for tenant %s: %s", tenant.name, exc)
            else:
                ctx.usage_of(tenant.name).release(nbytes, files)

    async def _reload(self, ctx: GatewayContext) -> None:
        """SIGHUP: read the config again; apply all of it or none (the old one stays)."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading the config")
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, load_config, self.config_path)
            check_dropfolders(new, known=self.ingest.watched if self.ingest is not None else ())
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload rejected, keeping the old config: %s", line,
                          extra={"event.action": "config-reload", "event.outcome": "failure"})
            self._count_reload(False)
        else:
            old = ctx.config
            if new.node != old.node or new.gateway.listen != old.gateway.listen:
                log.warning("reload: node and gateway.listen changes need a restart; other changes applied")
            if new.metrics != old.metrics:
                log.warning("reload: metrics changes need a restart; other changes applied")
            try:  # picks up a key made by `relayd keys rotate` and integrity changes
                ctx.spool.notary = make_notary(new)
            except SigningKeyError as exc:
                log.error("reload: signing key unusable, keeping the old one: %s", exc)
            ctx.config = new
            self.config = new
            ctx.prepare_tenants()
            if self.relay is not None:
                self.relay.update_config(new)
            if self.ingest is not None:
                self.ingest.update_config(new)
            self._count_reload(True)
            log.info("config reloaded tenants=%d destinations=%d", len(new.tenants), len(new.destinations),
                     extra={"event.action": "config-reload", "event.outcome": "success"})
        sd_notify(f"READY=1\n{await self._status(ctx)}")

    def _count_reload(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels("success" if ok else "failure").inc()
            self.metrics.last_reload_ok.set(1 if ok else 0)

    async def _drain(self, ctx: GatewayContext, deadline: float) -> None:
        """Refuse new sessions and uploads; let open uploads finish until ``deadline``; then close."""
        ctx.draining = True
        if ctx.uploads:
            log.info("draining: waiting for %d upload(s) in progress", len(ctx.uploads))
        while ctx.uploads and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if ctx.uploads:
            log.warning("drain timeout: %d upload(s) still open are cut off (nothing of them is committed; "
                        "the clients got no OK and send again)", len(ctx.uploads))
        for conn in list(ctx.connections):
            conn.close()
        limit = max(deadline, time.monotonic()) + 5
        while ctx.connections and time.monotonic() < limit:
            await asyncio.sleep(0.05)


def _report_crash(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("relay loop crashed: %r", task.exception(), exc_info=task.exception())


def run(config_path: str | Path) -> int:
    """Load the config and run the daemon on uvloop; return the exit code."""
    config = load_config(config_path)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(Daemon(config, Path(config_path)).run())
