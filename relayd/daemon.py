"""Daemon lifecycle: build services from config, run, reload on SIGHUP, drain on SIGTERM.

Start order: journal → recovery → relay → listeners → READY. Stop order: listeners → sessions
drain (uploads in progress may finish until ``gateway.drain_timeout``) → relay drain (attempts in
flight get half that; interrupted ones resume at the next start) → journal close.
Signal handlers only set events; all work is ordinary async code.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from pathlib import Path

import asyncssh

from relayd.config import Config, ConfigError, load_config
from relayd.gateway.context import GatewayContext
from relayd.gateway.server import load_host_keys, start_listeners
from relayd.integrity import KeyRing, Notary, SigningKeyError
from relayd.journal import Journal, JournalError
from relayd.relay.scheduler import Relay
from relayd.spool import Spool

__all__ = ["Daemon", "run", "journal_path", "sd_notify"]

log = logging.getLogger("relayd.daemon")


def make_notary(cfg: Config) -> Notary | None:
    """The manifest signer for ``cfg`` (the key is created on first use); None if manifests are off."""
    if not cfg.integrity.manifests:
        return None
    ring = KeyRing.open(cfg.node.state_dir)
    return Notary(ring, cfg.node.id, cfg.integrity.digests)


def journal_path(config: Config) -> Path:
    """Where the SQLite journal of this config lives."""
    return config.node.state_dir / "journal.db"


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


class Daemon:
    """One running gateway process."""

    def __init__(self, config: Config, config_path: Path):
        self.config = config
        self.config_path = config_path
        self.stop_event = asyncio.Event()
        self.reload_event = asyncio.Event()
        self.relay: Relay | None = None

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain, stop. Returns the exit code."""
        cfg = self.config
        for d in (cfg.node.state_dir, cfg.node.spool_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        journal = Journal.open(journal_path(cfg))
        spool = Spool(cfg.node.spool_dir, journal, make_notary(cfg))
        spool.recover(cfg.tenants)
        ctx = GatewayContext(config=cfg, spool=spool)
        ctx.prepare_tenants()
        relay = Relay(cfg, journal, spool)
        ctx.on_commit = relay.wake
        relay_task = asyncio.ensure_future(relay.run())
        relay_task.add_done_callback(_report_crash)
        self.relay = relay
        host_keys = load_host_keys(cfg)
        acceptors = await start_listeners(ctx, host_keys)
        loop = asyncio.get_running_loop()
        for sig, event in ((signal.SIGTERM, self.stop_event), (signal.SIGINT, self.stop_event),
                           (signal.SIGHUP, self.reload_event)):
            loop.add_signal_handler(sig, event.set)
        # Everything allocated so far lives for the whole run: keep the cyclic GC off it, and
        # collect less often (the hot path allocates many short-lived, acyclic objects).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        log.info("relayd ready node=%s tenants=%d", cfg.node.id, len(cfg.tenants))
        sd_notify("READY=1\nSTATUS=serving")
        housekeeping = asyncio.ensure_future(self._housekeeping(ctx))
        try:
            while not self.stop_event.is_set():
                waiters = [asyncio.ensure_future(self.stop_event.wait()),
                           asyncio.ensure_future(self.reload_event.wait())]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    self._reload(ctx)
        finally:
            housekeeping.cancel()
            sd_notify("STOPPING=1")
            log.info("stopping: closing listeners")
            for acceptor in acceptors:
                acceptor.close()
            await self._drain(ctx)
            await relay.stop(grace=max(1.0, ctx.config.gateway.drain_timeout / 2))
            relay_task.cancel()
            await asyncio.gather(relay_task, return_exceptions=True)
            journal.close()
            log.info("stopped")
        return 0

    async def _housekeeping(self, ctx: GatewayContext) -> None:
        """Watchdog pings, status line and the idle-session sweep."""
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        last_purge = 0.0
        while True:
            interval = 5.0
            if watchdog_usec:
                interval = min(interval, watchdog_usec / 2e6)
            if ctx.config.gateway.idle_timeout:
                interval = min(interval, max(0.2, ctx.config.gateway.idle_timeout / 4))
            await asyncio.sleep(interval)
            now = time.monotonic()
            idle_limit = ctx.config.gateway.idle_timeout
            for conn, gw_conn in list(ctx.connections.items()):
                if idle_limit and gw_conn.idle_for(now) > idle_limit:
                    log.info("closing idle connection conn=%s after %.0fs", gw_conn.conn_id, idle_limit)
                    conn.disconnect(asyncssh.DISC_BY_APPLICATION, "Idle timeout")
            retentions = [t.retention for t in ctx.config.tenants.values()]
            if retentions and now - last_purge >= min(60.0, max(1.0, min(retentions))):
                last_purge = now
                await self._purge(ctx)
            status = f"STATUS=serving; {len(ctx.connections)} connection(s), {len(ctx.uploads)} upload(s) open"
            sd_notify(("WATCHDOG=1\n" if watchdog_usec else "") + status)

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

    def _reload(self, ctx: GatewayContext) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload rejected, keeping the old config: %s", line)
        else:
            if new.node != ctx.config.node or new.gateway.listen != ctx.config.gateway.listen:
                log.warning("reload: node and gateway.listen changes need a restart; other changes applied")
            try:  # picks up a key made by `relayd keys rotate` and integrity changes
                ctx.spool.notary = make_notary(new)
            except SigningKeyError as exc:
                log.error("reload: signing key unusable, keeping the old one: %s", exc)
            ctx.config = new
            self.config = new
            ctx.prepare_tenants()
            if self.relay is not None:
                self.relay.update_config(new)
            log.info("config reloaded tenants=%d", len(new.tenants))
        sd_notify("READY=1\nSTATUS=serving")

    async def _drain(self, ctx: GatewayContext) -> None:
        ctx.draining = True
        deadline = time.monotonic() + ctx.config.gateway.drain_timeout
        if ctx.uploads:
            log.info("draining: waiting for %d upload(s) in progress", len(ctx.uploads))
        while ctx.uploads and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for conn in list(ctx.connections):
            conn.close()
        while ctx.connections and time.monotonic() < deadline + 5:
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
