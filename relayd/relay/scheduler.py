"""The relay scheduler: claim due deliveries, run them on their destinations, record outcomes.

One loop claims due deliveries from the journal per destination, up to that destination's
``concurrency`` in flight, and runs each as a task. An attempt's outcome is written to the
journal before anything else happens: ``delivered`` only after the destination confirmed size
(and SHA-256) and renamed the file into place; a retryable error waits with exponential backoff
and jitter (``retry_wait``) unless ``max_attempts``/``max_age`` are used up (``failed``).
Deliveries interrupted by a crash are ``sending`` in the journal and go back to ``pending`` at
start; the destination resumes their temp files.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from relayd.config import Config, DestinationConfig
from relayd.integrity.manifest import Signed, sidecar_bytes
from relayd.journal import Delivery, Journal, Transfer
from relayd.metrics import Metrics
from relayd.relay.destinations import Destination, DestinationError, Payload, create_destination
from relayd.spool import Spool

__all__ = ["Relay", "RetryPolicy"]

log = logging.getLogger("relayd.relay")

CLAIM_GATHER = 0.02
"""Seconds a busy destination's free slots may wait to be claimed together (see :meth:`Relay.run`)."""

JOURNAL_GAP = 0.008
"""Seconds between the relay's journal rounds (claims after commits; outcomes) while files keep
coming: a steady trickle of commits is claimed, and finished attempts recorded, a few at a time
instead of one journal round each (each round costs the gateway's commits thread switches). The
first commit after a quiet spell is claimed at once."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``initial * 2**(attempt-1)``, capped, ±``jitter``."""

    initial: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.2

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        base = min(self.maximum, self.initial * (2 ** max(0, attempts - 1)))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


class Relay:
    """Runs deliveries until stopped. All journal calls go through a worker thread."""

    def __init__(self, config: Config, journal: Journal, spool: Spool, policy: RetryPolicy | None = None,
                 factory: Callable[[DestinationConfig], Destination] = create_destination,
                 metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics
        self.recovered = asyncio.Event()
        """Set once interrupted deliveries were reset to pending (crash recovery) at start."""
        self.journal = journal
        self.spool = spool
        self.policy = policy or RetryPolicy()
        self._factory = factory
        self._destinations: dict[str, tuple[DestinationConfig, Destination]] = {}
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._finishes: list[tuple[str, str, dict[str, Any], asyncio.Future[None]]] = []
        self._finisher: asyncio.Task[None] | None = None
        self._last_finish = 0.0
        self._hmac_keys: dict[str, tuple[int, bytes]] = {}
        self._attempting: dict[asyncio.Task[None], tuple[str, str]] = {}  # task → (delivery id, destination)
        self._journal_thread = ThreadPoolExecutor(1, thread_name_prefix="relayd-relay-journal")
        self._look_all = True
        """The next round asks the journal about every destination (set by :meth:`wake` and by
        timeouts); otherwise only about those whose last claim filled every free slot."""
        self._saturated: dict[str, bool] = {}
        """Destination → its last claim took as many deliveries as it had free slots (more may wait)."""

    # -- control -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something may be due now (a commit happened, a retry was requested)."""
        self._look_all = True
        self._wake.set()

    def update_config(self, config: Config) -> None:
        """Apply a reloaded config: changed destinations are rebuilt on their next use."""
        self.config = config
        asyncio.ensure_future(self._report_orphans())
        self.wake()

    async def _report_orphans(self) -> None:
        """Warn about queued deliveries whose destination is not configured: they wait (nothing
        is dropped) until it is configured again or an admin cancels them."""
        try:
            waiting = await self._db(self.journal.waiting_by_destination)
        except Exception:  # noqa: BLE001 - a report only
            log.debug("cannot count waiting deliveries", exc_info=True)
            return
        for name, count in sorted(waiting.items()):
            if name not in self.config.destinations:
                log.warning("%d deliveries wait for destination %r, which is not in the config; they stay "
                            "queued until it is configured again", count, name)

    @property
    def in_flight(self) -> int:
        """Deliveries being attempted right now."""
        return sum(len(tasks) for tasks in self._in_flight.values())

    async def run(self) -> None:
        """Claim and run due deliveries until :meth:`stop`."""
        reset = await self._db(self.journal.reset_in_flight)
        if reset:
            log.info("recovery: %d interrupted deliveries will resume", reset)
        self.recovered.set()
        await self._report_orphans()
        last_claim: dict[str, float] = {}
        last_round = 0.0
        while not self._stopping:
            gap = last_round + JOURNAL_GAP - time.monotonic()
            if gap > 0 and self._look_all:
                await asyncio.sleep(gap)  # commits in quick succession: claim them together
            last_round = time.monotonic()
            self._wake.clear()
            look_all, self._look_all = self._look_all, False
            now = time.time()
            backlog = False   # some destination is full: a finishing attempt will wake us
            deferred = False  # a claim was put off to gather more free slots
            wants: list[tuple[str, int]] = []
            for name in self.config.destinations:
                slots = self._slots(name)
                free = slots - len(self._in_flight.get(name, ()))
                if free <= 0:
                    backlog = True
                    continue
                if not look_all and not self._saturated.get(name, True):
                    continue  # woken by a finished attempt, and nothing was left waiting here
                # Claim in batches while busy: one journal round per few finished attempts
                # instead of one per attempt (a finishing attempt wakes this loop), but never
                # hold free slots back for long.
                if free < max(1, slots // 4) and now - last_claim.get(name, 0.0) < CLAIM_GATHER:
                    deferred = True
                    continue
                last_claim[name] = now
                wants.append((name, free))
            # One trip to the journal thread per round: the claims and, if nothing is saturated,
            # when the next retry falls due.
            claims, next_due = ((await self._db(self._claim_round, wants, now, backlog)) if wants or not backlog
                                else ({}, None))
            for name, free in wants:
                claimed = claims[name]
                for delivery, transfer, signed in claimed:
                    task = asyncio.ensure_future(self._attempt(delivery, transfer, signed))
                    self._attempting[task] = (delivery.id, name)
                    tasks = self._in_flight.setdefault(name, set())
                    tasks.add(task)
                    task.add_done_callback(functools.partial(self._done, name))
                self._saturated[name] = len(claimed) == free
                if len(claimed) == free:
                    backlog = True
            # Sleep until woken (a commit, a finished attempt, a retry request) or until the next
            # retry falls due; at most 1 s, so changes made by other processes are seen too.
            # Deliveries already due but not claimed wait for a destination slot (a wake).
            now = time.time()
            if backlog or next_due is None or next_due <= now:
                timeout = 1.0
            else:
                timeout = min(1.0, next_due - now)
            if deferred:
                timeout = min(timeout, CLAIM_GATHER)
                await asyncio.sleep(CLAIM_GATHER / 4)  # let a few more attempts finish first
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.001))
            except asyncio.TimeoutError:
                self._look_all = True

    def quiesce(self) -> None:
        """Claim nothing more (shutdown begins); attempts in flight go on."""
        self._stopping = True
        self.wake()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let attempts in flight finish for ``grace`` seconds, then cancel them.

        Cancelled attempts are checkpointed: put back to ``pending`` (due at once) in the journal,
        so they resume at the next start from the temp file the destination kept. If even that
        write fails they stay ``sending``, which the next start's recovery resets the same way.
        """
        self.quiesce()
        tasks = [t for ts in self._in_flight.values() for t in ts]
        if tasks:
            log.info("relay: waiting up to %.0fs for %d delivery attempt(s)", grace, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=grace)
            interrupted = [self._attempting[t] for t in pending if t in self._attempting]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
            await self._checkpoint(interrupted)
        for _, dest in self._destinations.values():
            try:
                await dest.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing destination failed", exc_info=True)
        self._journal_thread.shutdown(wait=False)

    # -- one attempt ---------------------------------------------------------------------------

    async def _checkpoint(self, interrupted: list[tuple[str, str]]) -> None:
        """Record interrupted attempts (delivery id, destination) as ``pending``; an attempt whose
        outcome was written before it was cancelled keeps that outcome."""
        if not interrupted:
            return
        if self._finisher is not None and not self._finisher.done():
            await asyncio.wait([self._finisher], timeout=5)
        ids = [i for i, _ in interrupted]
        try:
            done = await self._db(self.journal.checkpoint_sending, ids, time.time(),
                                  "interrupted by shutdown; resumes at the next start")
        except Exception as exc:  # noqa: BLE001 - recovery at the next start does the same
            log.error("relay: cannot checkpoint %d interrupted deliveries (they resume anyway): %s", len(ids), exc)
            return
        if self.metrics is not None:
            for i, dest in interrupted:
                if i in done:
                    self.metrics.delivery(dest, "interrupted")
        log.info("relay: checkpointed %d interrupted delivery attempt(s) as pending: %s", len(done), " ".join(done))

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        self._in_flight.get(name, set()).discard(task)
        self._attempting.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task crashed: %r", task.exception())
        if self._saturated.get(name, True):
            self._wake.set()  # a slot is free and deliveries may be waiting for one

    def _slots(self, name: str) -> int:
        """How many deliveries ``name`` may run at once (0 if it cannot be built)."""
        try:
            return max(1, int(self._destination(name).slots))
        except ValueError as exc:  # validated at load; keep the relay alive if a kind disagrees
            log.error("destination %s unusable: %s", name, exc)
            return 0

    def _destination(self, name: str) -> Destination:
        cfg = self.config.destinations[name]
        known = self._destinations.get(name)
        if known is None or known[0] != cfg:
            if known is not None:
                asyncio.ensure_future(known[1].close())
            known = (cfg, self._factory(cfg))
            self._destinations[name] = known
        return known[1]

    def _claim_round(self, wants: list[tuple[str, int]], now: float, backlog: bool
                     ) -> tuple[dict[str, list[tuple[Delivery, Transfer, Signed | None]]], float | None]:
        """Claim for each (destination, free slots); then, unless some destination is (or is now)
        full, when the earliest waiting delivery falls due (worker thread)."""
        claims = {}
        for name, free in wants:
            claims[name] = self._claim(name, free, now)
            backlog = backlog or len(claims[name]) == free
        return claims, (None if backlog else self.journal.next_due())

    def _claim(self, name: str, limit: int, now: float) -> list[tuple[Delivery, Transfer, Signed | None]]:
        """Claim due deliveries and fetch their transfers' signed manifests (worker thread)."""
        claimed = self.journal.claim_due(name, limit, now)
        manifests = self.journal.manifests_for([t.id for _, t in claimed]) if claimed else {}
        return [(d, t, manifests.get(t.id)) for d, t in claimed]

    def _hmac_key(self, path: str) -> bytes:
        """The shared HMAC key in ``path`` (surrounding whitespace stripped), re-read when it changes."""
        mtime = os.stat(path).st_mtime_ns
        cached = self._hmac_keys.get(path)
        if cached is None or cached[0] != mtime:
            with open(path, "rb") as f:
                cached = (mtime, f.read().strip())
            self._hmac_keys[path] = cached
        return cached[1]

    def _sidecar(self, d: Delivery, t: Transfer, signed: Signed | None, ctx: str) -> bytes | None:
        """The sidecar document for this delivery, if its destination wants one."""
        opts = self.config.destinations[d.destination].options
        if not opts.get("sidecar"):
            return None
        if signed is None:
            log.warning("%s no signed manifest was recorded for this transfer; delivering without a sidecar", ctx)
            return None
        key_file = opts.get("hmac_key_file")
        return sidecar_bytes(signed, self._hmac_key(str(key_file)) if key_file else None)

    async def _attempt(self, d: Delivery, t: Transfer, signed: Signed | None = None) -> None:
        ctx = f"delivery={d.id} transfer={t.id} dest={d.destination} attempt={d.attempts}"
        if d.destination not in self.config.destinations:
            await self._finish(d.id, "failed", last_error="destination no longer configured")
            self._count(d.destination, "failed")
            log.error("delivery failed %s: destination no longer configured", ctx, extra=_event(d, t, "failure"))
            return
        if signed is not None:
            m = signed.manifest
            if m.get("size") != t.size or m.get("digests", {}).get("sha256") != t.sha256:
                await self._failed(d, t, ctx, "the journal's size/sha256 differ from the signed manifest", False)
                return
        try:
            sidecar = self._sidecar(d, t, signed, ctx)
        except OSError as exc:
            await self._failed(d, t, ctx, f"cannot read hmac_key_file: {exc.strerror or exc}", True)
            return
        payload = Payload(delivery_id=d.id, transfer_id=t.id, tenant=t.tenant, user=t.user, path=t.path,
                          source=self.spool.object_path(t), size=t.size, sha256=t.sha256, received_at=t.received_at,
                          sidecar=sidecar, manifest=signed, fresh=d.attempts == 1 and d.last_error is None)
        started = time.monotonic()
        try:
            outcome = await self._destination(d.destination).deliver(payload)
        except DestinationError as exc:
            await self._failed(d, t, ctx, str(exc), exc.retryable)
            return
        except (OSError, asyncio.TimeoutError) as exc:
            await self._failed(d, t, ctx, f"{type(exc).__name__}: {exc}", True)
            return
        except Exception as exc:  # noqa: BLE001 - a bug in a destination must not wedge the delivery
            log.exception("delivery attempt crashed %s", ctx)
            await self._failed(d, t, ctx, f"internal error: {type(exc).__name__}", True)
            return
        await self._finish(d.id, "delivered", remote_path=outcome.remote_path,
                       verified=outcome.verified, remote_digest=outcome.remote_digest,
                       bytes_sent=outcome.bytes_sent, last_error=outcome.note or None, receipt=outcome.receipt)
        elapsed = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.delivery(d.destination, "delivered", size=t.size, sent=outcome.bytes_sent, seconds=elapsed)
        phases = (f" (upload {outcome.upload_s:.2f}s, verify {outcome.verify_s:.2f}s)"
                  if outcome.upload_s is not None and outcome.verify_s is not None else "")
        log.info("delivered %s path=%s verified=%s bytes_sent=%d resumed_from=%d in %.2fs%s%s", ctx,
                 outcome.remote_path, outcome.verified, outcome.bytes_sent, outcome.resumed_from,
                 elapsed, phases, f" note={outcome.note}" if outcome.note else "",
                 extra={**_event(d, t, "success"), "event.duration": int(elapsed * 1e9)})

    async def _failed(self, d: Delivery, t: Transfer, ctx: str, error: str, retryable: bool) -> None:
        dest_cfg = self.config.destinations.get(d.destination)  # may be gone after a reload
        opts: Any = dest_cfg.options if dest_cfg is not None else {}
        max_attempts = opts.get("max_attempts")
        max_age = opts.get("max_age")
        age = time.time() - _epoch(t.received_at)
        exhausted = ((max_attempts is not None and d.attempts >= max_attempts)
                     or (max_age is not None and age >= max_age))
        if retryable and not exhausted:
            policy = RetryPolicy(initial=opts.get("retry_initial") or self.policy.initial,
                                 maximum=opts.get("retry_max") or self.policy.maximum, jitter=self.policy.jitter)
            delay = policy.delay(d.attempts)
            await self._finish(d.id, "retry_wait", last_error=error,
                           next_attempt_at=time.time() + delay)
            self.wake()  # the next round learns when this retry falls due
            self._count(d.destination, "retry")
            log.warning("delivery attempt failed %s: %s; retry in %.1fs", ctx, error, delay,
                        extra=_event(d, t, "failure"))
        else:
            why = "not retryable" if not retryable else "retries exhausted"
            await self._finish(d.id, "failed", last_error=error)
            self._count(d.destination, "failed")
            log.error("delivery failed %s (%s): %s", ctx, why, error, extra=_event(d, t, "failure"))

    def _count(self, destination: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery(destination, result)

    async def _finish(self, delivery_id: str, state: str, **fields: Any) -> None:
        """Record an outcome; outcomes arriving while a journal commit runs share the next one."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finishes.append((delivery_id, state, fields, fut))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.ensure_future(self._write_finishes())
        await fut

    async def _write_finishes(self) -> None:
        gap = self._last_finish + JOURNAL_GAP - time.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)  # outcomes in quick succession: record them together
        while self._finishes:
            self._last_finish = time.monotonic()
            batch, self._finishes = self._finishes, []
            try:
                await self._db(self.journal.finish_deliveries, [(i, st, f) for i, st, f, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiter
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a journal call on the relay's own journal thread.

        One thread, not the shared pool: the relay's calls queue there in order instead of
        several pool threads contending for the journal lock (and the GIL) with each other
        and with the gateway's commits.
        """
        return await asyncio.get_running_loop().run_in_executor(self._journal_thread,
                                                                functools.partial(fn, *args, **kwargs))


def _event(d: Delivery, t: Transfer, outcome: str) -> dict[str, Any]:
    """ECS-style fields of a delivery log line (used by ``--log-format json``)."""
    return {"event.action": "delivery", "event.category": "file", "event.outcome": outcome,
            "relayd.delivery_id": d.id, "relayd.transfer_id": t.id, "relayd.destination": d.destination,
            "relayd.tenant": t.tenant}


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
