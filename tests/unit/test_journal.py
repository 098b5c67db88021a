"""Journal: durable transfers with their deliveries, schema migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relayd.journal import _SCHEMA, Journal, JournalError, Transfer, new_id, utc_now


def _transfer(**kw: object) -> Transfer:
    base = dict(id=new_id(), tenant="acme", user="u", source="127.0.0.1:1", path="/a.csv", size=3,
                sha256="0" * 64, received_at=utc_now(), state="committed", object="o")
    base.update(kw)
    return Transfer(**base)  # type: ignore[arg-type]


def test_transfer_and_deliveries_commit_together(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    t = _transfer()
    made = j.add_transfer(t, ["partner", "archive", "partner"])
    assert [d.destination for d in made] == ["partner", "archive"]
    assert all(d.state == "pending" and d.attempts == 0 for d in made)
    assert j.get_transfer(t.id) == t
    assert [d.destination for d in j.deliveries_of(t.id)] == ["partner", "archive"]
    unrouted = _transfer()
    assert j.add_transfer(unrouted) == []
    assert j.deliveries_for([t.id, unrouted.id])[unrouted.id] == []


def test_failed_insert_leaves_nothing(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    t = _transfer()
    j.add_transfer(t, ["a"])
    with pytest.raises(JournalError):
        j.add_transfer(t, ["b"])  # same id: the whole transaction rolls back
    assert [d.destination for d in j.deliveries_of(t.id)] == ["a"]


def test_v1_journal_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA[0] + "; PRAGMA user_version=1;")
    conn.execute("INSERT INTO transfers VALUES ('T1','acme','u','x','/a',1,'00','2026-01-01T00:00:00Z',"
                 "'committed','T1')")
    conn.commit()
    conn.close()
    j = Journal.open(db)
    assert j.get_transfer("T1") is not None
    assert j.deliveries_of("T1") == []
    j.add_transfer(_transfer(), ["d"])


def test_newer_journal_refused(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={len(_SCHEMA) + 1}")
    conn.close()
    with pytest.raises(JournalError, match="newer"):
        Journal.open(db)


def test_ids_sort_by_time() -> None:
    ids = [new_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(len(i) == 26 for i in ids)


def test_claim_finish_and_requeue(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    t1, t2 = _transfer(), _transfer(path="/b.csv")
    j.add_transfer(t1, ["p"])
    j.add_transfer(t2, ["p", "q"])
    claimed = j.claim_due("p", 10, now=9e12)
    assert [(d.transfer_id, d.attempts, d.state) for d, _ in claimed] == [(t1.id, 1, "sending"), (t2.id, 1, "sending")]
    assert claimed[1][1] == t2  # the transfer comes with its delivery
    assert j.claim_due("p", 10, now=9e12) == []  # sending: not claimed twice
    (d1, _), (d2, _) = claimed
    j.finish_deliveries([(d1.id, "delivered", {"remote_path": "/x", "verified": "sha256", "bytes_sent": 3}),
                         (d2.id, "retry_wait", {"last_error": "boom", "next_attempt_at": 5.0})])
    got = {d.id: d for d in j.deliveries_of(t1.id) + j.deliveries_of(t2.id)}
    assert got[d1.id].state == "delivered" and got[d1.id].bytes_sent == 3 and got[d1.id].remote_path == "/x"
    assert got[d2.id].state == "retry_wait" and got[d2.id].last_error == "boom"
    with pytest.raises(ValueError):
        j.finish_delivery(d1.id, "delivered", colour="blue")
    j.finish_delivery(d2.id, "failed", last_error="gave up")
    assert [d.state for d in j.requeue(d2.id, now=1.0)] == ["pending"]
    assert j.delivery_counts() == {"delivered": 1, "pending": 2}
    assert j.reset_in_flight() == 0
