"""``relayd status``, ``relayd show`` and ``relayd cancel``: the journal read (and, for cancel,
changed) directly, so they work while the daemon runs.

SQLite in WAL mode lets readers work beside the daemon without blocking it; ``cancel`` is one
short transaction, and the daemon's scheduler claims only ``pending``/``retry_wait`` rows in its
own transaction, so a cancelled delivery is never attempted afterwards. Each command builds a
plain dict (``--json`` prints it) and renders it for a terminal.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from relayd import __version__
from relayd.config import Config
from relayd.daemon import journal_path, pid_path, running_pid
from relayd.integrity.keys import SIGNING_DIR, SigningKeyError, load_public_keys, verify_signature
from relayd.journal import Delivery, Journal, Transfer

__all__ = ["status", "format_status", "show", "format_show", "cancel", "format_cancel", "UnknownId", "table",
           "human_size", "human_age", "run_as_state_owner"]

BACKLOG_STATES = ("pending", "retry_wait", "sending", "failed", "quarantined")


class UnknownId(Exception):
    """No transfer or delivery has this id (the CLI prints one line and exits 1)."""

    exit_code = 1


def run_as_state_owner(config: Config) -> None:
    """Run as root (``sudo relayd cancel ...``): become the owner of ``node.state_dir`` (the daemon's
    user) before touching the journal, so files SQLite makes next to it (``-wal``, ``-shm``) stay
    the daemon's and never lock it out. A no-op for other users or a root-owned state_dir."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(config.node.state_dir)
    except OSError:
        return
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


# -- formatting helpers --------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> list[str]:
    """Left-aligned columns separated by two spaces; trailing blanks stripped."""
    body = [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in [list(headers), *body]) for i in range(len(headers))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [list(headers), *body]]


def human_size(n: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


def human_age(seconds: float) -> str:
    """``3725`` → ``1h 2m``."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


# -- status --------------------------------------------------------------------------------------


def _daemon_state(config: Config) -> dict[str, Any]:
    path = pid_path(config)
    try:
        pid = running_pid(path)
    except OSError as exc:
        return {"running": None, "pid": None, "since": None, "pid_file": str(path),
                "error": f"cannot read {path}: {exc.strerror or exc}"}
    since = None
    if pid is not None:
        try:
            since = _iso(os.stat(path).st_mtime)
        except OSError:
            pass
    return {"running": pid is not None, "pid": pid, "since": since, "pid_file": str(path)}


def status(config: Config) -> dict[str, Any]:
    """Daemon state, version, node id, transfer/delivery counts, oldest waiting delivery, backlog."""
    run_as_state_owner(config)
    journal = Journal.open(journal_path(config), readonly=True)
    try:
        transfers = journal.transfer_counts()
        deliveries = journal.delivery_counts()
        stats = journal.queue_stats()
    finally:
        journal.close()
    oldest: dict[str, Any] | None = None
    if stats.oldest_waiting is not None:
        d = stats.oldest_waiting
        oldest = {"id": d.id, "transfer_id": d.transfer_id, "destination": d.destination, "state": d.state,
                  "attempts": d.attempts, "created_at": d.created_at,
                  "age_seconds": round(time.time() - _epoch(d.created_at), 3), "last_error": d.last_error}
    backlog: dict[str, dict[str, Any]] = {}
    for name in sorted(set(config.destinations) | set(stats.by_destination)):
        states = stats.by_destination.get(name, {})
        backlog[name] = {**{s: states.get(s, 0) for s in BACKLOG_STATES},
                         "configured": name in config.destinations}
    return {"version": __version__, "node": config.node.id, "daemon": _daemon_state(config),
            "journal": str(journal_path(config)), "transfers": transfers, "deliveries": deliveries,
            "oldest_waiting": oldest, "destinations": backlog}


def format_status(info: dict[str, Any]) -> str:
    """``relayd status`` for a terminal."""
    daemon = info["daemon"]
    if daemon["running"]:
        since = daemon["since"]
        up = f", up {human_age(time.time() - _epoch(since))}" if since else ""
        state = f"running (pid {daemon['pid']}, since {since}{up})"
    elif daemon["running"] is None:
        state = f"unknown ({daemon['error']})"
    else:
        state = "not running"
    lines = [f"relayd {info['version']}  node {info['node']}",
             f"daemon:      {state}",
             f"journal:     {info['journal']}",
             f"transfers:   {_counts(info['transfers'])}",
             f"deliveries:  {_counts(info['deliveries'])}"]
    old = info["oldest_waiting"]
    if old is None:
        lines.append("oldest waiting delivery: none (queue empty)")
    else:
        err = f"; last error: {old['last_error']}" if old["last_error"] else ""
        lines.append(f"oldest waiting delivery: {old['id']} to {old['destination']}, {old['state']} for "
                     f"{human_age(old['age_seconds'])} (since {old['created_at'][:19]}Z), "
                     f"{old['attempts']} attempt(s){err}")
    if info["destinations"]:
        lines.append("")
        rows = [(name, *(b[s] for s in BACKLOG_STATES), "" if b["configured"] else "not in the config")
                for name, b in info["destinations"].items()]
        lines += table(("DESTINATION", *(s.upper() for s in BACKLOG_STATES), ""), rows)
    return "\n".join(lines)


# -- show ----------------------------------------------------------------------------------------


def _manifest_summary(journal: Journal, config: Config, transfer_id: str) -> dict[str, Any] | None:
    signed = journal.manifest_of(transfer_id)
    if signed is None:
        return None
    m = signed.manifest
    try:
        keys = load_public_keys(config.node.state_dir / SIGNING_DIR)
    except SigningKeyError as exc:
        check = f"not checked ({exc})"
    else:
        key = keys.get(signed.key_id)
        if key is None:
            check = f"not checked (key {signed.key_id} is not in this gateway's key directory)"
        else:
            check = "valid" if verify_signature(key, signed.signature, signed.body) else "INVALID"
    return {"key_id": signed.key_id, "gateway": m.get("gateway"), "version": m.get("version"),
            "size": m.get("size"), "digests": m.get("digests", {}), "received_at": m.get("received_at"),
            "signature": check}


def show(config: Config, ident: str) -> dict[str, Any]:
    """Everything the journal knows about a transfer or a delivery; :class:`UnknownId` if neither."""
    run_as_state_owner(config)
    journal = Journal.open(journal_path(config), readonly=True)
    try:
        transfer = journal.get_transfer(ident)
        delivery: Delivery | None = None
        if transfer is None:
            delivery = journal.get_delivery(ident)
            if delivery is None:
                raise UnknownId(f"no transfer or delivery with id {ident}")
            transfer = journal.get_transfer(delivery.transfer_id)
        assert transfer is not None
        deliveries = journal.deliveries_of(transfer.id)
        manifest = _manifest_summary(journal, config, transfer.id)
    finally:
        journal.close()
    out: dict[str, Any] = {"kind": "delivery" if delivery is not None else "transfer",
                           "transfer": transfer.to_dict(), "manifest": manifest,
                           "deliveries": [_delivery_dict(d) for d in deliveries]}
    if delivery is not None:
        out["delivery"] = _delivery_dict(delivery)
    return out


def _delivery_dict(d: Delivery) -> dict[str, Any]:
    doc = d.to_dict()
    doc["receipt"] = bool(d.receipt)  # the document itself: `relayd receipt`
    doc["next_attempt_at"] = _iso(d.next_attempt_at) if d.state in ("pending", "retry_wait") else None
    return doc


def _fields(doc: dict[str, Any], names: Sequence[str], indent: str = "") -> list[str]:
    width = max(len(n) for n in names) + 1
    out = []
    for n in names:
        value = doc.get(n)
        if value is None or value == "":
            value = "-"
        if n == "size" and isinstance(value, int):
            value = f"{value} ({human_size(value)})"
        out.append(f"{indent}{(n + ':').ljust(width)} {value}")
    return out


def format_show(info: dict[str, Any]) -> str:
    """``relayd show`` for a terminal."""
    t = info["transfer"]
    lines: list[str] = []
    if info["kind"] == "delivery":
        d = info["delivery"]
        lines.append(f"delivery {d['id']}")
        lines += _fields(d, ("destination", "state", "attempts", "created_at", "updated_at", "next_attempt_at",
                             "last_error", "remote_path", "verified", "remote_digest", "bytes_sent", "receipt"), "  ")
        lines.append("")
    lines.append(f"transfer {t['id']}")
    lines += _fields(t, ("tenant", "user", "path", "size", "sha256", "received_at", "source", "state", "object"),
                     "  ")
    m = info["manifest"]
    lines.append("")
    if m is None:
        lines.append("manifest: none (committed while integrity.manifests was off)")
    else:
        lines.append(f"manifest: signed by {m['gateway']} with key {m['key_id']}; signature {m['signature']}")
        for name, value in sorted(m["digests"].items()):
            lines.append(f"  {name}: {value}")
    lines.append("")
    if not info["deliveries"]:
        lines.append("deliveries: none (no route matched: unrouted)")
    else:
        lines.append("deliveries:")
        rows = [(d["id"], d["destination"], d["state"], d["attempts"], d["updated_at"][:19].replace("T", " "),
                 d["remote_path"] or "", (d["last_error"] or "")[:80]) for d in info["deliveries"]]
        lines += table(("ID", "DESTINATION", "STATE", "ATTEMPTS", "UPDATED", "REMOTE PATH", "LAST ERROR"), rows, "  ")
    return "\n".join(lines)


# -- cancel --------------------------------------------------------------------------------------


def cancel(config: Config, ident: str) -> tuple[list[str], list[Delivery], Transfer | None]:
    """Cancel a delivery, or every pending/retry_wait/failed delivery of a transfer.

    Returns (ids cancelled now, the deliveries ``ident`` names, the transfer if ``ident`` is one).
    Raises :class:`UnknownId`.
    """
    run_as_state_owner(config)
    journal = Journal.open(journal_path(config))
    try:
        transfer = journal.get_transfer(ident)
        if transfer is None and journal.get_delivery(ident) is None:
            raise UnknownId(f"no transfer or delivery with id {ident}")
        changed, rows = journal.cancel(ident)
    finally:
        journal.close()
    return changed, rows, transfer


def format_cancel(changed: list[str], rows: list[Delivery]) -> str:
    """One line per delivery: what it is now, and whether this command changed it."""
    if not rows:
        return "nothing to cancel: the transfer has no deliveries (unrouted)"
    lines = []
    for d in rows:
        note = "cancelled" if d.id in changed else {
            "sending": "being sent right now; not cancelled (cancel again once the attempt ended)",
            "delivered": "already delivered; nothing to cancel",
            "cancelled": "was cancelled already",
        }.get(d.state, f"{d.state}; nothing to cancel")
        lines.append(f"{d.id}  {d.destination}  {d.state}  {note}")
    return "\n".join(lines)
