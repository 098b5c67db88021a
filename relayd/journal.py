"""Durable state: the one module that speaks SQL.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives power loss.
The interface is narrow (plain dataclasses in, plain dataclasses out) so another backend can
serve several gateways later. All methods are synchronous and thread-safe; callers on the event
loop run them in a worker thread.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from relayd.integrity.manifest import Signed as SignedManifest

__all__ = ["Journal", "Transfer", "DroppedFile", "QueueStats", "JournalError", "new_id", "utc_now"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

_SCHEMA = [
    # version 1
    """
    CREATE TABLE transfers (
        id          TEXT PRIMARY KEY,
        tenant      TEXT NOT NULL,
        user        TEXT NOT NULL,
        source      TEXT NOT NULL,
        path        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        received_at TEXT NOT NULL,
        state       TEXT NOT NULL,
        object      TEXT NOT NULL
    );
    CREATE INDEX transfers_tenant ON transfers(tenant, received_at);
    CREATE INDEX transfers_state ON transfers(state);
    """,
    # version 2: one delivery per (transfer, destination), created with the transfer
    """
    CREATE TABLE deliveries (
        id              TEXT PRIMARY KEY,
        transfer_id     TEXT NOT NULL REFERENCES transfers(id),
        destination     TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        last_error      TEXT,
        remote_path     TEXT,
        verified        TEXT,
        remote_digest   TEXT,
        bytes_sent      INTEGER NOT NULL DEFAULT 0,
        UNIQUE (transfer_id, destination)
    );
    CREATE INDEX deliveries_due ON deliveries(state, next_attempt_at);
    CREATE INDEX deliveries_transfer ON deliveries(transfer_id);
    """,
    # version 3: the signed manifest of each committed file, written with the transfer
    """
    CREATE TABLE manifests (
        transfer_id TEXT PRIMARY KEY REFERENCES transfers(id),
        key_id      TEXT NOT NULL,
        body        BLOB NOT NULL,
        signature   BLOB NOT NULL
    );
    """,
    # version 4: peer relay. Sender: the receipt a peer signed, per delivery. Receiver: which
    # sender transfer each received transfer came from (a repeated offer is answered, not
    # committed twice), and how many regions changed (block size from history).
    """
    ALTER TABLE deliveries ADD COLUMN receipt TEXT;
    CREATE TABLE peer_origins (
        sender_gateway     TEXT NOT NULL,
        sender_transfer_id TEXT NOT NULL,
        transfer_id        TEXT NOT NULL REFERENCES transfers(id),
        changed_regions    INTEGER,
        PRIMARY KEY (sender_gateway, sender_transfer_id)
    );
    CREATE INDEX peer_origins_transfer ON peer_origins(transfer_id);
    CREATE INDEX transfers_path ON transfers(tenant, path);
    """,
    # version 5: drop folders. One row per committed original still in its drop folder (between
    # the commit and its removal, or for good with after: keep), written with the transfer: a
    # file found again with the same path, size, mtime and SHA-256 is not committed twice.
    """
    CREATE TABLE dropfolder_files (
        folder      TEXT NOT NULL,
        path        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        inode       INTEGER NOT NULL,
        ctime_ns    INTEGER NOT NULL,
        transfer_id TEXT NOT NULL REFERENCES transfers(id),
        PRIMARY KEY (folder, path)
    );
    """,
]

# Delivery states (DESIGN.md): pending → sending → delivered | retry_wait → failed | denied | quarantined
DELIVERY_STATES = ("pending", "sending", "delivered", "retry_wait", "failed", "denied", "quarantined",
                   "cancelled")
TERMINAL_STATES = frozenset({"delivered", "failed", "denied", "quarantined", "cancelled"})
_FINISH_FIELDS = frozenset({"last_error", "next_attempt_at", "remote_path", "verified", "remote_digest",
                            "bytes_sent", "receipt"})


_WATCHED_STATES = ("pending", "retry_wait", "sending", "failed", "quarantined", "denied")
"""Delivery states :meth:`Journal.queue_stats` counts (everything but delivered and cancelled)."""


class JournalError(Exception):
    """The journal cannot be opened or written."""

    exit_code = 1


def new_id() -> str:
    """A 26-character, time-sortable unique id (ULID layout, Crockford base32)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(secrets.token_bytes(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def utc_now() -> str:
    """Current UTC time in RFC 3339 with microseconds, e.g. ``2026-12-03T17:00:00.123456Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Delivery:
    """One committed file on its way to one destination."""

    id: str
    transfer_id: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    created_at: str
    updated_at: str
    last_error: str | None = None
    remote_path: str | None = None
    verified: str | None = None
    remote_digest: str | None = None
    bytes_sent: int = 0
    receipt: str | None = None
    """The signed receipt document a receiving relayd returned (relayd destinations)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON output."""
        return asdict(self)


@dataclass(frozen=True)
class DroppedFile:
    """A drop-folder original committed as a transfer (its dedup identity).

    ``folder`` is the drop folder's real path, ``path`` the file's path inside it; ``inode`` and
    ``ctime_ns`` let an unchanged file be recognized without reading it again.
    """

    folder: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    inode: int
    ctime_ns: int
    transfer_id: str = ""
    """Filled in by :meth:`Journal.add_transfer` (the transfer the file was committed as)."""


@dataclass(frozen=True)
class Transfer:
    """One committed file as recorded in the journal."""

    id: str
    tenant: str
    user: str
    source: str
    path: str
    size: int
    sha256: str
    received_at: str
    state: str
    object: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON output."""
        return asdict(self)


@dataclass(frozen=True)
class QueueStats:
    """Deliveries not delivered yet: counts by destination → state (pending, retry_wait, sending,
    failed, quarantined, denied) and the oldest delivery still waiting (None: queue empty)."""

    by_destination: dict[str, dict[str, int]]
    oldest_waiting: Delivery | None


class Journal:
    """SQLite-backed journal. Open with :meth:`open`; every write is committed before it returns."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> "Journal":
        """Open (and create or migrate, unless ``readonly``) the journal at ``path``."""
        p = Path(path)
        try:
            if readonly:
                if not p.exists():
                    raise JournalError(f"no journal at {p} (has the daemon ever run with this config?)")
                conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=10)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(p, check_same_thread=False, isolation_level=None, timeout=10)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.row_factory = sqlite3.Row
            journal = cls(conn, p)
            if not readonly:
                journal._migrate()
            return journal
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {p}: {exc}") from None

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_SCHEMA):
            raise JournalError(f"journal {self.path} has schema version {version}, newer than this relayd")
        for i in range(version, len(_SCHEMA)):
            with self._tx():
                for stmt in _SCHEMA[i].split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                self._conn.execute(f"PRAGMA user_version={i + 1}")

    def _tx(self, durable: bool = True) -> "_Tx":
        return _Tx(self._conn, self._lock, durable)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def add_transfer(self, t: Transfer, destinations: Sequence[str] = (),
                     manifest: SignedManifest | None = None,
                     origin: tuple[str, str, int | None] | None = None,
                     dropped: DroppedFile | None = None) -> list[Delivery]:
        """Insert a committed transfer, its signed manifest and one pending delivery per
        destination, atomically (with ``dropped``: the drop-folder original it came from).

        Durable when this returns. Raises :class:`JournalError`.
        """
        return self.add_transfers([(t, destinations, manifest, origin, dropped)])[0]

    def add_transfers(self, items: Sequence[tuple[Transfer, Sequence[str], SignedManifest | None,
                                                  tuple[str, str, int | None] | None, DroppedFile | None]]
                      ) -> list[list[Delivery]]:
        """:meth:`add_transfer` for several transfers in one transaction (group commit: one
        fsync for all; all or none). Items are (transfer, destinations, manifest, origin, dropped)."""
        now = utc_now()
        out: list[list[Delivery]] = []
        try:
            with self._tx():
                for t, destinations, manifest, origin, dropped in items:
                    deliveries = [Delivery(id=new_id(), transfer_id=t.id, destination=d, state="pending", attempts=0,
                                           next_attempt_at=time.time(), created_at=now, updated_at=now)
                                  for d in dict.fromkeys(destinations)]
                    out.append(deliveries)
                    self._conn.execute(
                        "INSERT INTO transfers (id, tenant, user, source, path, size, sha256, received_at, state,"
                        " object) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (t.id, t.tenant, t.user, t.source, t.path, t.size, t.sha256, t.received_at, t.state,
                         t.object))
                    self._conn.executemany(
                        "INSERT INTO deliveries (id, transfer_id, destination, state, attempts, next_attempt_at,"
                        " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                        [(d.id, d.transfer_id, d.destination, d.state, d.attempts, d.next_attempt_at, d.created_at,
                          d.updated_at) for d in deliveries])
                    if manifest is not None:
                        self._conn.execute("INSERT INTO manifests (transfer_id, key_id, body, signature)"
                                           " VALUES (?,?,?,?)", (t.id, manifest.key_id, manifest.body,
                                                                 manifest.signature))
                    if origin is not None:
                        self._conn.execute("INSERT INTO peer_origins (sender_gateway, sender_transfer_id,"
                                           " transfer_id, changed_regions) VALUES (?,?,?,?)",
                                           (origin[0], origin[1], t.id, origin[2]))
                    if dropped is not None:
                        self._conn.execute(
                            "INSERT OR REPLACE INTO dropfolder_files (folder, path, size, mtime_ns, sha256, inode,"
                            " ctime_ns, transfer_id) VALUES (?,?,?,?,?,?,?,?)",
                            (dropped.folder, dropped.path, dropped.size, dropped.mtime_ns, dropped.sha256,
                             dropped.inode, dropped.ctime_ns, t.id))
        except sqlite3.Error as exc:
            which = items[0][0].id if len(items) == 1 else f"{items[0][0].id} (and {len(items) - 1} more)"
            raise JournalError(f"cannot record transfer {which}: {exc}") from None
        return out

    def manifest_of(self, transfer_id: str) -> SignedManifest | None:
        """The signed manifest recorded with ``transfer_id`` (None for transfers without one)."""
        with self._lock:
            row = self._conn.execute("SELECT key_id, body, signature FROM manifests WHERE transfer_id = ?",
                                     (transfer_id,)).fetchone()
        if row is None:
            return None
        return SignedManifest(bytes(row["body"]), bytes(row["signature"]), row["key_id"])

    def origin_transfer(self, sender_gateway: str, sender_transfer_id: str) -> Transfer | None:
        """The transfer committed from a peer's offer of ``sender_transfer_id``, if any."""
        with self._lock:
            row = self._conn.execute(
                "SELECT t.* FROM peer_origins o JOIN transfers t ON t.id = o.transfer_id"
                " WHERE o.sender_gateway = ? AND o.sender_transfer_id = ?", (sender_gateway, sender_transfer_id)).fetchone()
        return Transfer(**dict(row)) if row is not None else None

    def last_changed_regions(self, tenant: str, path: str) -> int | None:
        """Changed regions of the latest delta-received version of ``path`` (None: no history)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT o.changed_regions FROM transfers t JOIN peer_origins o ON o.transfer_id = t.id"
                " WHERE t.tenant = ? AND t.path = ? AND o.changed_regions IS NOT NULL"
                " ORDER BY t.rowid DESC LIMIT 1", (tenant, path)).fetchone()
        return int(row[0]) if row is not None else None

    def latest_transfer(self, tenant: str, path: str) -> Transfer | None:
        """The newest committed (not purged) transfer of ``path`` in ``tenant``."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM transfers WHERE tenant = ? AND path = ? AND state = 'committed'"
                                     " ORDER BY rowid DESC LIMIT 1", (tenant, path)).fetchone()
        return Transfer(**dict(row)) if row is not None else None

    def manifests_for(self, transfer_ids: Sequence[str]) -> dict[str, SignedManifest]:
        """The signed manifests of several transfers, by transfer id (missing ones left out)."""
        out: dict[str, SignedManifest] = {}
        ids = list(dict.fromkeys(transfer_ids))
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = self._conn.execute(
                    f"SELECT transfer_id, key_id, body, signature FROM manifests WHERE transfer_id IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall()
                for r in rows:
                    out[r["transfer_id"]] = SignedManifest(bytes(r["body"]), bytes(r["signature"]), r["key_id"])
        return out

    # -- drop folders --------------------------------------------------------------------------

    def dropped_file(self, folder: str, path: str) -> DroppedFile | None:
        """The committed original recorded at ``path`` of drop folder ``folder``, if any."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM dropfolder_files WHERE folder = ? AND path = ?",
                                     (folder, path)).fetchone()
        return DroppedFile(**dict(row)) if row is not None else None

    def dropped_paths(self, folder: str) -> set[str]:
        """Paths of drop folder ``folder`` that have a committed original recorded."""
        with self._lock:
            rows = self._conn.execute("SELECT path FROM dropfolder_files WHERE folder = ?", (folder,)).fetchall()
        return {r[0] for r in rows}

    def forget_dropped(self, folder: str, paths: Sequence[str]) -> None:
        """Drop the records of originals that left ``folder`` (deleted or moved after their commit).

        Not fsynced on its own: a record that survives a crash only names a file that is gone,
        and is pruned when the folder is scanned at the next start.
        """
        if not paths:
            return
        with self._tx(durable=False):
            self._conn.executemany("DELETE FROM dropfolder_files WHERE folder = ? AND path = ?",
                                   [(folder, p) for p in paths])

    # -- delivery scheduling -------------------------------------------------------------------

    def reset_in_flight(self) -> int:
        """Crash recovery: deliveries left ``sending`` go back to ``pending`` (they resume)."""
        with self._tx():
            cur = self._conn.execute("UPDATE deliveries SET state = 'pending', updated_at = ? WHERE state = 'sending'",
                                     (utc_now(),))
        return cur.rowcount

    def claim_due(self, destination: str, limit: int, now: float) -> list[tuple[Delivery, Transfer]]:
        """Mark up to ``limit`` due deliveries of ``destination`` as ``sending`` (attempts + 1).

        Not fsynced on its own (the next outcome's commit makes it durable): a claim lost in a
        power cut only means the next attempt counts as a first one again, which publishes the
        same bytes under the same names (the temp file is truncated, an identical final file is
        overwritten or recognised). Saves one fsync per scheduling round.
        """
        if limit <= 0:
            return []
        with self._tx(durable=False):
            rows = self._conn.execute(
                "SELECT id FROM deliveries WHERE destination = ? AND state IN ('pending', 'retry_wait')"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?", (destination, now, limit)).fetchall()
            ids = [r[0] for r in rows]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            self._conn.execute(f"UPDATE deliveries SET state = 'sending', attempts = attempts + 1, updated_at = ?"
                               f" WHERE id IN ({marks})", [utc_now(), *ids])
            out = self._conn.execute(
                f"SELECT d.*, t.tenant AS t_tenant, t.user AS t_user, t.source AS t_source, t.path AS t_path,"
                f" t.size AS t_size, t.sha256 AS t_sha256, t.received_at AS t_received_at, t.state AS t_state,"
                f" t.object AS t_object FROM deliveries d JOIN transfers t ON t.id = d.transfer_id"
                f" WHERE d.id IN ({marks}) ORDER BY d.next_attempt_at, d.id", ids).fetchall()
        result = []
        for r in out:
            row = dict(r)
            t = Transfer(id=row["transfer_id"], **{k[2:]: row.pop(k) for k in list(row) if k.startswith("t_")})
            result.append((Delivery(**row), t))
        return result

    def finish_delivery(self, delivery_id: str, state: str, **fields: Any) -> None:
        """Record the outcome of an attempt (durable when this returns). ``fields``: last_error,
        next_attempt_at, remote_path, verified, remote_digest, bytes_sent (added)."""
        self.finish_deliveries([(delivery_id, state, fields)])

    def finish_deliveries(self, outcomes: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Record several outcomes in one transaction (group commit: one fsync for all)."""
        now = utc_now()
        statements = []
        for delivery_id, state, fields in outcomes:
            if state not in DELIVERY_STATES:
                raise ValueError(f"unknown delivery state {state!r}")
            unknown = set(fields) - _FINISH_FIELDS
            if unknown:
                raise ValueError(f"unknown delivery fields {sorted(unknown)}")
            sets = ["state = ?", "updated_at = ?", "last_error = ?"]
            args: list[object] = [state, now, fields.get("last_error")]
            for column in ("next_attempt_at", "remote_path", "verified", "remote_digest", "receipt"):
                if fields.get(column) is not None:
                    sets.append(f"{column} = ?")
                    args.append(fields[column])
            if fields.get("bytes_sent") is not None:
                sets.append("bytes_sent = bytes_sent + ?")
                args.append(fields["bytes_sent"])
            statements.append((f"UPDATE deliveries SET {', '.join(sets)} WHERE id = ?", [*args, delivery_id]))
        with self._tx():
            for sql, args in statements:
                self._conn.execute(sql, args)

    def requeue(self, ident: str, now: float) -> list[Delivery]:
        """``relayd retry``: put a delivery (by delivery id) or every unfinished, failed or cancelled
        delivery of a transfer (by transfer id) back to ``pending``, due now, with a fresh attempt count."""
        with self._tx():
            cur = self._conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"
                " WHERE (id = ? OR transfer_id = ?) AND state IN ('failed', 'retry_wait', 'pending', 'cancelled')",
                (now, utc_now(), ident, ident))
            del cur
            rows = self._conn.execute("SELECT * FROM deliveries WHERE id = ? OR transfer_id = ? ORDER BY rowid",
                                      (ident, ident)).fetchall()
        return [Delivery(**dict(r)) for r in rows]

    def purgeable(self, tenant: str, cutoff: str, limit: int = 1000) -> list[Transfer]:
        """Committed transfers of ``tenant`` whose deliveries are all terminal (or that have none)
        and whose last delivery change (or receipt) is at or before ``cutoff`` (RFC 3339)."""
        terminal = ",".join(f"'{s}'" for s in sorted(TERMINAL_STATES))
        with self._lock:
            rows = self._conn.execute(
                "SELECT t.* FROM transfers t WHERE t.tenant = ? AND t.state = 'committed'"
                f" AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.transfer_id = t.id AND d.state NOT IN ({terminal}))"
                " AND COALESCE((SELECT MAX(d.updated_at) FROM deliveries d WHERE d.transfer_id = t.id),"
                " t.received_at) <= ? ORDER BY t.rowid LIMIT ?", (tenant, cutoff, limit)).fetchall()
        return [Transfer(**dict(r)) for r in rows]

    def mark_purged(self, transfer_ids: Sequence[str]) -> None:
        """Record that the spool objects of these transfers are gone."""
        with self._tx():
            self._conn.executemany("UPDATE transfers SET state = 'purged' WHERE id = ?", [(i,) for i in transfer_ids])

    def next_due(self) -> float | None:
        """When the earliest waiting delivery is due (unix time), or None."""
        with self._lock:
            row = self._conn.execute("SELECT MIN(next_attempt_at) FROM deliveries"
                                     " WHERE state IN ('pending', 'retry_wait')").fetchone()
        return row[0]

    def delivery_counts(self) -> dict[str, int]:
        """Number of deliveries per state."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def checkpoint_sending(self, delivery_ids: Sequence[str], now: float, note: str) -> list[str]:
        """Shutdown: deliveries of ``delivery_ids`` still ``sending`` go back to ``pending``, due
        ``now``, with ``note`` as last error. Returns the ids changed (others kept their outcome)."""
        ids = list(delivery_ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._tx():
            changed = [r[0] for r in self._conn.execute(
                f"SELECT id FROM deliveries WHERE id IN ({marks}) AND state = 'sending'", ids).fetchall()]
            if changed:
                self._conn.execute(
                    f"UPDATE deliveries SET state = 'pending', next_attempt_at = ?, last_error = ?, updated_at = ?"
                    f" WHERE id IN ({','.join('?' * len(changed))})", [now, note, utc_now(), *changed])
        return changed

    def transfer_counts(self) -> dict[str, int]:
        """Number of transfers per state (``relayd status``)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM transfers GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def queue_stats(self) -> "QueueStats":
        """Deliveries not delivered yet, per destination and state, and the oldest one still
        waiting (for metrics and ``relayd status``; reads the index of unfinished states only)."""
        marks = ",".join("?" * len(_WATCHED_STATES))
        with self._lock:
            rows = self._conn.execute(f"SELECT destination, state, COUNT(*) FROM deliveries WHERE state IN ({marks})"
                                      " GROUP BY destination, state", _WATCHED_STATES).fetchall()
            oldest = self._conn.execute("SELECT * FROM deliveries WHERE state IN ('pending', 'retry_wait', 'sending')"
                                        " ORDER BY created_at, rowid LIMIT 1").fetchone()
        by_dest: dict[str, dict[str, int]] = {}
        for dest, state, count in rows:
            by_dest.setdefault(dest, {})[state] = count
        return QueueStats(by_dest, Delivery(**dict(oldest)) if oldest is not None else None)

    def cancel(self, ident: str) -> tuple[list[str], list[Delivery]]:
        """``relayd cancel``: mark a delivery (by delivery id) or every pending, retry_wait or
        failed delivery of a transfer (by transfer id) ``cancelled``. A delivery being sent right
        now (``sending``) is left alone. The scheduler claims only pending/retry_wait rows, in its
        own transaction, so a cancelled delivery is never attempted afterwards.

        Returns the ids cancelled now and every delivery ``ident`` names (after the change).
        """
        with self._tx():
            ids = [r[0] for r in self._conn.execute(
                "SELECT id FROM deliveries WHERE (id = ? OR transfer_id = ?) AND state IN ('pending', 'retry_wait',"
                " 'failed')", (ident, ident)).fetchall()]
            if ids:
                self._conn.execute(f"UPDATE deliveries SET state = 'cancelled', updated_at = ? WHERE id IN "
                                   f"({','.join('?' * len(ids))})", [utc_now(), *ids])
            rows = self._conn.execute("SELECT * FROM deliveries WHERE id = ? OR transfer_id = ? ORDER BY rowid",
                                      (ident, ident)).fetchall()
        return ids, [Delivery(**dict(r)) for r in rows]

    def waiting_by_destination(self) -> dict[str, int]:
        """Unfinished (pending, retry_wait, sending) deliveries per destination name."""
        with self._lock:
            rows = self._conn.execute("SELECT destination, COUNT(*) FROM deliveries WHERE state IN "
                                      "('pending', 'retry_wait', 'sending') GROUP BY destination").fetchall()
        return {r[0]: r[1] for r in rows}

    def deliveries_of(self, transfer_id: str) -> list[Delivery]:
        """The deliveries of one transfer, in creation order."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM deliveries WHERE transfer_id = ? ORDER BY rowid",
                                      (transfer_id,)).fetchall()
        return [Delivery(**dict(r)) for r in rows]

    def deliveries_for(self, transfer_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """Deliveries grouped by transfer id (for listings)."""
        out: dict[str, list[Delivery]] = {tid: [] for tid in transfer_ids}
        ids = list(transfer_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT * FROM deliveries WHERE transfer_id IN ({','.join('?' * len(chunk))}) ORDER BY rowid",
                    chunk).fetchall()
            for r in rows:
                out[r["transfer_id"]].append(Delivery(**dict(r)))
        return out

    def get_delivery(self, delivery_id: str) -> Delivery | None:
        """One delivery by id."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        return Delivery(**dict(row)) if row is not None else None

    def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The transfer with this id, or None."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM transfers WHERE id = ?", (transfer_id,)).fetchone()
        return Transfer(**dict(row)) if row else None

    def list_transfers(self, *, tenant: str | None = None, state: str | None = None,
                       since: str | None = None, limit: int | None = None) -> list[Transfer]:
        """Transfers, oldest first, optionally filtered."""
        where: list[str] = []
        args: list[object] = []
        for column, value, op in (("tenant", tenant, "="), ("state", state, "="), ("received_at", since, ">=")):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        sql = "SELECT * FROM transfers" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY rowid"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [Transfer(**dict(r)) for r in rows]

    def object_names(self, tenant: str) -> set[str]:
        """Spool object names referenced by a tenant's transfers (for recovery)."""
        with self._lock:
            rows = self._conn.execute("SELECT object FROM transfers WHERE tenant = ?", (tenant,)).fetchall()
        return {r[0] for r in rows}


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the journal lock; rollback on error."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock, durable: bool = True):
        self._conn = conn
        self._lock = lock
        self._durable = durable

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            if not self._durable:
                # WAL + NORMAL: the commit is not fsynced itself; the next FULL commit makes it
                # durable along with its own changes (SQLite syncs the WAL up to that point).
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._restore()
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._conn.execute("COMMIT")
            else:
                self._conn.execute("ROLLBACK")
        finally:
            try:
                self._restore()
            finally:
                self._lock.release()

    def _restore(self) -> None:
        if not self._durable:
            self._conn.execute("PRAGMA synchronous=FULL")
