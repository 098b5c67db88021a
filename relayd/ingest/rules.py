"""Pure drop-folder logic: which names are taken, when a file has settled, where it lands.

No I/O here. The watcher feeds in events, scan results and probe results and asks the
:class:`Tracker` what is due for a look; the worker threads do the looking.

A file is *settled* (safe to take) when either

- a close-after-write (or a rename into its name) was seen and nothing changed for
  :data:`CLOSE_QUIET` seconds (at most ``settle``), or
- two looks at least ``settle`` seconds apart saw the same size, mtime and inode, with no event
  in between (the only rule that works without events: network mounts, rescans, restarts).

Any write event starts over. A writer that holds a file open and pauses longer than ``settle``
without writing is indistinguishable from a finished one; choose ``settle`` accordingly.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import os
import re
from dataclasses import dataclass
from typing import Iterator

from relayd.config import DropFolderConfig, glob_to_regex

__all__ = ["CLOSE_QUIET", "Ident", "ident_of", "Selector", "name_problem", "inbox_parts", "moved_name",
           "Candidate", "Look", "Tracker", "backoff"]

CLOSE_QUIET = 0.5
"""Seconds without any change after a close-after-write before a file is taken."""

Ident = tuple[int, int, int, int]
"""What identifies a version of a file: (size, mtime_ns, inode, ctime_ns)."""


def ident_of(st: os.stat_result) -> Ident:
    """The :data:`Ident` of a stat result."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def same_version(a: Ident | None, b: Ident | None) -> bool:
    """Size, mtime and inode equal (ctime left out: links and chmods by relayd change it)."""
    return a is not None and b is not None and a[:3] == b[:3]


def backoff(failures: int, cap: float) -> float:
    """Seconds before the next try after ``failures`` failed ones: 1, 2, 4, ... at most ``cap``."""
    return max(0.1, min(cap, 2.0 ** max(0, failures - 1)))


class Selector:
    """Which paths (relative to the drop folder, ``/``-separated) a drop folder takes."""

    def __init__(self, cfg: DropFolderConfig):
        self.cfg = cfg
        self._regex = glob_to_regex(cfg.pattern)
        temp = "|".join(f"(?:{fnmatch.translate(p)})" for p in cfg.temp_patterns)
        self._temp = re.compile(temp, re.DOTALL).match if temp else None

    def is_temp(self, name: str) -> bool:
        """A file or folder name ignored until renamed (like ``DropFolderConfig.is_temp_name``)."""
        return self._temp is not None and self._temp(name) is not None

    def descends(self, rel_dir: str) -> bool:
        """True if the scan goes into subfolder ``rel_dir``."""
        return self.cfg.recursive and not any(self.is_temp(c) for c in rel_dir.split("/"))

    def ignored(self, rel: str) -> bool:
        """True for paths in excluded folders, temp names, and subfolders of a non-recursive folder."""
        parts = rel.split("/")
        if len(parts) > 1 and not self.cfg.recursive:
            return True
        return any(self.is_temp(c) for c in parts)

    def wants(self, rel: str) -> bool:
        """True if ``rel`` is a name this folder takes (once it has settled)."""
        return bool(rel) and not self.ignored(rel) and self._regex.match(rel) is not None


def name_problem(rel: str) -> str | None:
    """Why ``rel`` cannot become an inbox path (not UTF-8, control characters), or None."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "name has control characters"
    return None


def inbox_parts(into: str, rel: str) -> tuple[str, ...]:
    """Path components in the tenant's inbox of file ``rel`` of a folder with ``into``."""
    return tuple(c for c in into.split("/") if c) + tuple(rel.split("/"))


def moved_name(name: str, transfer_id: str) -> str:
    """The name a moved original gets when ``name`` is already taken in the move target."""
    return f"{name}.{transfer_id}"


@dataclass
class Candidate:
    """A file that may become ready: what was seen of it and when."""

    since: float
    """Monotonic time of the last event, or of the baseline look."""
    closed: bool = False
    """A close-after-write or a rename into the name was the last event."""
    ident: Ident | None = None
    """Baseline of the stat rule (None: no look since the last event)."""
    failures: int = 0
    not_before: float = 0.0
    busy: bool = False
    """Handed out for a look or an ingest; events still update it."""
    gen: int = 0
    """Changes with every event, so a look's result can tell it is stale."""


@dataclass(frozen=True)
class Look:
    """A due candidate handed out to a worker: what it should check."""

    rel: str
    gen: int
    closed: bool
    ident: Ident | None


class Tracker:
    """Candidates of one drop folder and when each is due for a look (a heap, lazily cleaned)."""

    def __init__(self, settle: float, quiet: float = CLOSE_QUIET):
        self.settle = settle
        self.quiet = min(quiet, settle)
        self._cands: dict[str, Candidate] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._gens = itertools.count(1)
        """Generations are unique across candidates: a look at a forgotten candidate can never
        match a new one at the same path."""

    def __len__(self) -> int:
        return len(self._cands)

    def __contains__(self, rel: object) -> bool:
        return rel in self._cands

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._cands))

    def get(self, rel: str) -> Candidate | None:
        """The candidate at ``rel``, if any."""
        return self._cands.get(rel)

    def _due(self, c: Candidate) -> float:
        wait = self.quiet if c.closed or c.ident is None else self.settle
        return max(c.since + wait, c.not_before)

    def _push(self, rel: str, c: Candidate) -> None:
        if not c.busy:
            heapq.heappush(self._heap, (self._due(c), next(self._seq), rel))

    # -- what was seen ---------------------------------------------------------------------------

    def event(self, rel: str, now: float, *, closed: bool) -> None:
        """A write (``closed=False``) or a close-after-write / rename-in (``closed=True``) at ``rel``."""
        c = self._cands.get(rel)
        if c is None:
            c = self._cands[rel] = Candidate(since=now)
        c.since, c.closed, c.ident, c.failures, c.not_before = now, closed, None, 0, 0.0
        c.gen = next(self._gens)
        self._push(rel, c)

    def observe(self, rel: str, ident: Ident, now: float) -> None:
        """A scan saw ``rel`` with ``ident``: new candidates get it as baseline; a candidate whose
        baseline differs starts over (a change no event told of)."""
        c = self._cands.get(rel)
        if c is None:
            c = self._cands[rel] = Candidate(since=now, ident=ident, gen=next(self._gens))
            self._push(rel, c)
        elif not c.busy and not c.closed and c.ident is not None and not same_version(c.ident, ident):
            c.since, c.ident = now, ident
            c.gen = next(self._gens)
            self._push(rel, c)

    def forget(self, rel: str) -> None:
        """``rel`` is gone (deleted, moved away)."""
        c = self._cands.pop(rel, None)
        if c is not None:
            c.gen = next(self._gens)

    def forget_under(self, prefix: str) -> None:
        """Everything in folder ``prefix`` (relative, no trailing ``/``) is gone."""
        start = prefix + "/"
        for rel in [r for r in self._cands if r.startswith(start)]:
            self.forget(rel)

    def clear(self) -> None:
        """Forget everything (the folder went away)."""
        for c in self._cands.values():
            c.gen = next(self._gens)
        self._cands.clear()
        self._heap.clear()

    # -- what is due -----------------------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[Look]:
        """Up to ``limit`` candidates due by ``now``, marked busy."""
        out: list[Look] = []
        while self._heap and len(out) < limit and self._heap[0][0] <= now:
            when, _, rel = heapq.heappop(self._heap)
            c = self._cands.get(rel)
            if c is None or c.busy or self._due(c) != when:
                continue  # stale entry
            c.busy = True
            out.append(Look(rel=rel, gen=c.gen, closed=c.closed, ident=c.ident))
        return out

    def next_due(self) -> float | None:
        """When the earliest candidate is due (monotonic), or None."""
        while self._heap:
            when, _, rel = self._heap[0]
            c = self._cands.get(rel)
            if c is not None and not c.busy and self._due(c) == when:
                return when
            heapq.heappop(self._heap)
        return None

    # -- results of looks ------------------------------------------------------------------------

    def _back(self, look: Look) -> Candidate | None:
        """The candidate of ``look``, no longer busy; None if it was forgotten meanwhile."""
        c = self._cands.get(look.rel)
        if c is not None:
            c.busy = False
        return c

    def release(self, look: Look) -> None:
        """Nothing was decided (an event came during the look): due again as the events say."""
        c = self._back(look)
        if c is not None:
            self._push(look.rel, c)

    def baseline(self, look: Look, ident: Ident, now: float) -> None:
        """Not settled yet: ``ident`` is the new baseline (unless an event came meanwhile)."""
        c = self._back(look)
        if c is None:
            return
        if c.gen == look.gen:
            c.since, c.ident, c.closed = now, ident, False
        self._push(look.rel, c)

    def restart(self, look: Look, now: float) -> None:
        """The file changed while it was being taken: wait for it to settle again."""
        c = self._back(look)
        if c is None:
            return
        if c.gen == look.gen:
            c.since, c.ident, c.closed = now, None, False
            c.gen = next(self._gens)
        self._push(look.rel, c)

    def retry(self, look: Look, now: float, cap: float) -> float:
        """It failed: look again after a backoff (at most ``cap``); returns the delay."""
        c = self._back(look)
        if c is None:
            return 0.0
        c.failures += 1
        delay = backoff(c.failures, cap)
        if c.gen == look.gen:
            c.not_before = now + delay
        self._push(look.rel, c)
        return delay

    def finished(self, look: Look) -> bool:
        """It was taken (or is gone): forget it, unless an event came meanwhile (then look again).
        True if it was forgotten."""
        c = self._back(look)
        if c is None:
            return True
        if c.gen == look.gen:
            del self._cands[look.rel]
            return True
        self._push(look.rel, c)
        return False
