"""watchdog (inotify on Linux) behind a small interface: add and remove a folder's watch, stop.

Every call into watchdog runs in a throwaway daemon thread with a timeout: its add/remove/stop
join its own threads without one, and a watch on a wedged mount must never block relayd. Events
arrive in the observer thread and go to a ``push(token, kind, src, dest)`` callable; ``kind`` is
one of ``created modified closed moved deleted dir_created dir_moved dir_deleted lost``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Callable, TypeVar

__all__ = ["Watcher", "WATCHDOG_TIMEOUT"]

log = logging.getLogger("relayd.ingest")

WATCHDOG_TIMEOUT = 10.0
"""Longest wait for watchdog to add or remove a watch or to stop."""

T = TypeVar("T")
Push = Callable[[object, str, str, str], None]


_KINDS: dict[type, str] = {}


def _event_kinds() -> dict[type, str]:
    """watchdog event class → our event kind (imported lazily: watchdog starts no thread)."""
    if not _KINDS:
        from watchdog import events as e

        _KINDS.update({e.FileCreatedEvent: "created", e.FileModifiedEvent: "modified", e.FileClosedEvent: "closed",
                       e.FileMovedEvent: "moved", e.FileDeletedEvent: "deleted", e.DirCreatedEvent: "dir_created",
                       e.DirMovedEvent: "dir_moved", e.DirDeletedEvent: "dir_deleted"})
        lost = getattr(e, "EventsLostEvent", None)
        if lost is not None:
            _KINDS[lost] = "lost"
    return _KINDS


class Watcher:
    """One watchdog observer for all drop folders (started on first use)."""

    def __init__(self) -> None:
        self._observer: Any = None

    async def add(self, root: str, recursive: bool, push: Push, token: object) -> Any:
        """Watch ``root``; events go to ``push`` tagged with ``token``. Returns the watch, or None
        if watchdog did not answer in time. Raises OSError if the kernel refuses the watch."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler

        kinds = _event_kinds()

        class Handler(FileSystemEventHandler):
            def dispatch(self, event: FileSystemEvent) -> None:
                kind = kinds.get(type(event))
                if kind is not None:
                    push(token, kind, os.fsdecode(event.src_path), os.fsdecode(event.dest_path or ""))

        observer = await _bounded("start", self._get_observer)
        if observer is None:
            return None
        return await _bounded("add a watch", observer.schedule, Handler(), root, recursive=recursive,
                              event_filter=list(kinds))

    async def remove(self, watch: Any) -> None:
        """Stop a watch (errors and timeouts are logged, never raised)."""
        try:
            await _bounded("remove a watch", self._observer.unschedule, watch)
        except (KeyError, ValueError, OSError):
            pass

    async def close(self) -> None:
        """Stop the observer, if it was started."""
        if self._observer is not None:
            await _bounded("stop watching", _stop_observer, self._observer)

    def _get_observer(self) -> Any:
        if self._observer is None:
            try:
                from watchdog.observers.inotify import InotifyObserver

                observer: Any = InotifyObserver(generate_full_events=True)
            except Exception:  # noqa: BLE001 - not Linux: the platform's default observer
                from watchdog.observers import Observer

                observer = Observer()
            observer.daemon = True
            observer.start()
            self._observer = observer
        return self._observer


async def _bounded(what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T | None:
    """Call watchdog in a throwaway daemon thread; None (logged) if it does not return within
    :data:`WATCHDOG_TIMEOUT`. Its exceptions are raised here."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def resolve(result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def call() -> None:
        try:
            result = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            loop.call_soon_threadsafe(resolve, None, exc)
        else:
            loop.call_soon_threadsafe(resolve, result, None)
    threading.Thread(target=call, name="relayd-watchdog-call", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(fut), WATCHDOG_TIMEOUT)
    except asyncio.TimeoutError:
        log.warning("dropfolders: watchdog did not %s within %.0fs; going on without waiting", what,
                    WATCHDOG_TIMEOUT)
        return None


def _stop_observer(observer: Any) -> None:
    observer.stop()
    observer.join(timeout=WATCHDOG_TIMEOUT)
