"""Drop folders without a daemon: config, the settle rules, the journal dedup record, the group
commit, and the worker functions on real folders (scan, look, take, remove/move)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from relayd.config import Config, ConfigError, DropFolderConfig, RouteConfig, TenantConfig, parse_config
from relayd.ingest import check_dropfolders, worker
from relayd.ingest.rules import CLOSE_QUIET, Look, Selector, Tracker, backoff, ident_of, inbox_parts
from relayd.ingest.worker import DROP_USER, FolderIO
from relayd.journal import DroppedFile, Journal, JournalError, Transfer, utc_now
from relayd.spool import CommitRequest, Spool

ACME = TenantConfig(name="acme")


# --------------------------------------------------------------------------------------------
# Config


def _cfg(tmp: Path, *items: dict[str, Any], **node: Any) -> Config:
    return parse_config({"node": {"id": "gw", "state_dir": str(tmp / "state"), "spool_dir": str(tmp / "spool"),
                                  **node},
                         "tenants": {"acme": {}, "globex": {}}, "dropfolders": list(items)}, base_dir=tmp)


def _errors(tmp: Path, *items: dict[str, Any], **node: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _cfg(tmp, *items, **node)
    assert info.value.exit_code == 2
    return info.value.errors


def test_config_item_with_every_key(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"path": "drop/acme", "tenant": "acme", "pattern": "**/*.csv", "recursive": True,
                          "settle": "2s", "after": "move:done/acme", "temp_patterns": ["*.tmp"], "into": "in//x/",
                          "rescan": "5m"})
    [d] = cfg.dropfolders
    assert d == DropFolderConfig(path=tmp_path / "drop/acme", tenant="acme", pattern="**/*.csv", recursive=True,
                                 settle=2.0, after="move", move_to=tmp_path / "done/acme", temp_patterns=("*.tmp",),
                                 into="/in/x", rescan=300.0)


def test_config_defaults(tmp_path: Path) -> None:
    [d] = _cfg(tmp_path, {"path": "/srv/drop", "tenant": "acme"}).dropfolders
    assert (d.pattern, d.recursive, d.settle, d.after, d.move_to, d.into, d.rescan) == \
        ("**", False, 5.0, "delete", None, "/", 60.0)
    assert d.temp_patterns == (".*", "*.tmp", "*.part", "*.filepart")


@pytest.mark.parametrize("item, expected", [
    ({"path": "/d", "tenant": "acme", "after": "move"}, "dropfolders[0].after: must be delete, keep or move:DIR"),
    ({"path": "/d", "tenant": "acme", "after": "remove"}, "dropfolders[0].after: must be delete, keep or move:DIR"),
    ({"path": "/d", "tenant": "acmee"}, "dropfolders[0].tenant: unknown tenant 'acmee' (did you mean 'acme'?)"),
    ({"path": "/d", "tenant": "acme", "pattern": "a[b"}, "dropfolders[0].pattern: invalid glob"),
    ({"path": "/d", "tenant": "acme", "settle": 0}, "dropfolders[0].settle: must be greater than 0"),
    ({"path": "/d", "tenant": "acme", "into": "../up"}, "dropfolders[0].into: must be a folder inside"),
    ({"path": "/d", "tenant": "acme", "temp_patterns": ["a/b"]}, "dropfolders[0].temp_patterns[0]: temp patterns"),
    ({"path": "/d", "tenant": "acme", "after": "move:/d/done"}, "dropfolders[0].after: the move target /d/done is "
                                                               "inside the watched folder"),
    ({"tenant": "acme"}, "dropfolders[0].path: is required"),
    ({"path": "/d", "tenant": "acme", "recursiv": True}, "dropfolders[0].recursiv: unknown key (did you mean "
                                                         "'recursive'?)"),
])
def test_config_errors_name_the_key(tmp_path: Path, item: dict[str, Any], expected: str) -> None:
    errors = _errors(tmp_path, item)
    assert any(e.startswith(expected) for e in errors), errors


def test_move_target_inside_an_excluded_folder_is_allowed(tmp_path: Path) -> None:
    [d] = _cfg(tmp_path, {"path": "/d", "tenant": "acme", "after": "move:/d/.done"}).dropfolders
    assert d.move_to == Path("/d/.done")


def test_overlaps_are_refused(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {"path": "/srv/drop", "tenant": "acme"}, {"path": "/srv/drop/x", "tenant": "globex"},
                     {"path": "/srv/other", "tenant": "acme", "after": "move:/srv/drop/done"})
    assert "dropfolders[1].path: /srv/drop/x overlaps dropfolders[0].path (/srv/drop); drop folders must not " \
           "overlap" in errors
    assert any(e.startswith("dropfolders[2].after: the move target /srv/drop/done is inside dropfolders[0].path")
               for e in errors), errors
    errors = _errors(tmp_path, {"path": str(tmp_path), "tenant": "acme"})
    assert any(e.startswith("dropfolders[0].path:") and "overlaps node.state_dir" in e for e in errors), errors


def test_check_dropfolders_at_start(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    cfg = _cfg(tmp_path, {"path": "a", "tenant": "acme"}, {"path": "missing", "tenant": "acme"},
               {"path": "f", "tenant": "acme", "after": "move:nowhere"}, {"path": "link", "tenant": "globex"})
    with pytest.raises(ConfigError) as info:
        check_dropfolders(cfg)
    assert info.value.errors == [
        f"dropfolders[1].path: folder does not exist: {tmp_path / 'missing'}",
        f"dropfolders[2].path: folder {tmp_path / 'f'} is not a folder",
        f"dropfolders[2].after: move target does not exist: {tmp_path / 'nowhere'}",
        f"dropfolders[3].path: resolves to {tmp_path / 'a'}, which overlaps dropfolders[0].path ({tmp_path / 'a'})",
    ]
    ok = _cfg(tmp_path, {"path": "a", "tenant": "acme"}, {"path": "gone", "tenant": "globex"})
    check_dropfolders(ok, known=[tmp_path / "gone"])  # already watched: an alert, not a config error


# --------------------------------------------------------------------------------------------
# Selection and settling (pure)


def test_selector() -> None:
    flat = Selector(DropFolderConfig(path=Path("/d"), tenant="t", pattern="*.csv"))
    assert flat.wants("a.csv") and not flat.wants("a.txt") and not flat.wants("sub/a.csv")
    assert not flat.wants("a.csv.part") and not flat.wants(".a.csv") and not flat.wants("a.csv.tmp")
    deep = Selector(DropFolderConfig(path=Path("/d"), tenant="t", pattern="**/*.csv", recursive=True))
    assert deep.wants("a.csv") and deep.wants("x/y/a.csv") and not deep.wants("x/.done/a.csv")
    assert deep.descends("x/y") and not deep.descends(".git") and not flat.descends("x")
    assert inbox_parts("/", "x/a.csv") == ("x", "a.csv") and inbox_parts("/in/erp", "a") == ("in", "erp", "a")


def test_close_after_write_is_taken_after_a_quiet_moment() -> None:
    t = Tracker(settle=5.0)
    t.event("a", 100.0, closed=False)
    t.event("a", 100.1, closed=True)
    assert t.due(100.1 + CLOSE_QUIET - 0.01, 10) == []
    [look] = t.due(100.1 + CLOSE_QUIET, 10)
    assert look.closed and look.rel == "a"


def test_write_without_close_needs_a_baseline_and_settle() -> None:
    t = Tracker(settle=2.0)
    t.event("a", 10.0, closed=False)
    [look] = t.due(10.0 + CLOSE_QUIET, 10)       # first look only takes a baseline
    assert not look.closed and look.ident is None
    t.baseline(look, (5, 1, 1, 1), 10.6)
    assert t.due(12.5, 10) == []                 # not settled for 2s yet
    [again] = t.due(12.6, 10)
    assert again.ident == (5, 1, 1, 1)           # the worker compares against this


def test_a_write_during_a_look_makes_its_result_stale() -> None:
    t = Tracker(settle=1.0)
    t.observe("a", (1, 1, 1, 1), 0.0)
    [look] = t.due(1.0, 10)
    t.event("a", 1.1, closed=False)              # the writer is back
    assert not t.finished(look)                  # so it is not forgotten...
    assert "a" in t and t.due(1.2, 10) == []     # ...and waits again
    assert t.due(1.1 + CLOSE_QUIET, 10)


def test_a_look_at_a_forgotten_file_never_applies_to_a_new_one_at_that_path() -> None:
    t = Tracker(settle=1.0)
    t.event("a", 0.0, closed=True)
    [look] = t.due(1.0, 10)
    t.forget("a")                                # deleted while looked at...
    t.event("a", 1.1, closed=True)               # ...and a new file of that name
    assert not t.finished(look)                  # the old result does not forget the new file
    assert [x.rel for x in t.due(1.1 + CLOSE_QUIET, 10)] == ["a"]


def test_scan_sees_a_change_no_event_reported() -> None:
    t = Tracker(settle=1.0)
    t.observe("a", (1, 1, 1, 1), 0.0)
    t.observe("a", (2, 2, 1, 2), 0.9)            # grew meanwhile
    assert t.due(1.5, 10) == []
    assert t.due(1.9, 10)


def test_retry_backs_off_and_restart_waits_again() -> None:
    t = Tracker(settle=1.0)
    t.observe("a", (1, 1, 1, 1), 0.0)
    [look] = t.due(1.0, 10)
    assert t.retry(look, 1.0, cap=60) == 1.0
    [look] = t.due(2.0, 10)
    assert t.retry(look, 2.0, cap=60) == 2.0
    assert t.due(3.9, 10) == [] and t.due(4.0, 10)
    assert [backoff(n, 10) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    t2 = Tracker(settle=1.0)
    t2.observe("b", (1, 1, 1, 1), 0.0)
    [look] = t2.due(1.0, 10)
    t2.restart(look, 1.0)
    assert t2.due(1.0 + CLOSE_QUIET, 10)[0].ident is None


# --------------------------------------------------------------------------------------------
# Journal and group commit


def _transfer(tid: str, path: str = "/a") -> Transfer:
    return Transfer(id=tid, tenant="acme", user="u", source="s", path=path, size=1, sha256="0" * 64,
                    received_at=utc_now(), state="committed", object=tid)


def test_dedup_record_is_written_with_the_transfer(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    rec = DroppedFile(folder="/d", path="x/a.csv", size=1, mtime_ns=2, sha256="f" * 64, inode=3, ctime_ns=4)
    j.add_transfer(_transfer("T1"), (), None, None, rec)
    assert j.dropped_file("/d", "x/a.csv") == dataclasses.replace(rec, transfer_id="T1")
    assert j.dropped_paths("/d") == {"x/a.csv"} and j.dropped_file("/other", "x/a.csv") is None
    j.add_transfer(_transfer("T2"), (), None, None, dataclasses.replace(rec, size=9))  # changed file: replaced
    assert j.dropped_file("/d", "x/a.csv").transfer_id == "T2"  # type: ignore[union-attr]
    j.forget_dropped("/d", ["x/a.csv"])
    assert j.dropped_paths("/d") == set()
    with pytest.raises(JournalError):  # all or nothing: the duplicate id fails the whole batch
        j.add_transfers([(_transfer("T3"), ("dest",), None, None, rec), (_transfer("T1"), (), None, None, None)])
    assert j.get_transfer("T3") is None and j.dropped_paths("/d") == set()
    j.close()


def test_commit_many(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    spool = Spool(tmp_path / "spool", j)
    d = spool.ensure_tenant("acme")
    (d.inbox / "taken").mkdir()
    reqs = []
    for name in ("a", "taken", "b"):
        src, fd = spool.new_staging("acme")
        os.write(fd, name.encode())
        os.close(fd)
        reqs.append(CommitRequest(tenant="acme", user="u", source="s", path=f"/{name}", src=src,
                                  publish_to=d.inbox / name, size=len(name), destinations=("x",)))
    a, bad, b = spool.commit_many(reqs)
    assert isinstance(a, Transfer) and isinstance(b, Transfer) and isinstance(bad, IsADirectoryError)
    assert (d.inbox / "a").read_text() == "a" and (d.inbox / "b").read_text() == "b"
    assert [x.destination for x in j.deliveries_of(a.id)] == ["x"]
    assert sorted(os.listdir(d.objects)) == sorted([a.id, b.id])

    src, fd = spool.new_staging("acme")
    os.close(fd)
    req = CommitRequest(tenant="acme", user="u", source="s", path="/c", src=src, publish_to=d.inbox / "c", size=0)

    def broken(*_: Any, **__: Any) -> None:
        raise JournalError("disk full")
    j.add_transfers = broken  # type: ignore[method-assign]
    [err] = spool.commit_many([req])
    assert isinstance(err, JournalError)
    assert not (d.inbox / "c").exists() and len(os.listdir(d.objects)) == 2  # nothing recorded, no orphan
    j.close()


# --------------------------------------------------------------------------------------------
# The worker on real folders


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    j = Journal.open(tmp_path / "state" / "journal.db")
    yield j
    j.close()


def _io(tmp_path: Path, journal: Journal, drop: Path | None = None, **kw: Any) -> FolderIO:
    drop = drop or tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    spool = Spool(tmp_path / "spool", journal)
    spool.ensure_tenant("acme")
    cfg = DropFolderConfig(path=drop, tenant="acme", recursive=True, **kw)
    return FolderIO(cfg=cfg, root=os.path.realpath(drop), spool=spool, stop=threading.Event())


def _take(io: FolderIO, *rels: str, tenant: TenantConfig = ACME) -> list[worker.Outcome]:
    items = [(Look(rel=r, gen=0, closed=True, ident=None), ident_of(os.lstat(io.path(r)))) for r in rels]
    return worker.ingest(io, tenant, items)


def _inbox(io: FolderIO) -> Path:
    return io.spool.dirs("acme").inbox


def test_take_commits_through_the_door_then_deletes(tmp_path: Path, journal: Journal) -> None:
    io = _io(tmp_path, journal)
    (tmp_path / "drop" / "x").mkdir()
    (tmp_path / "drop" / "x" / "a.csv").write_bytes(b"1,2\n")
    routed = TenantConfig(name="acme", routes=(RouteConfig(match="**/*.csv", to=("d",)),))
    [o] = _take(io, "x/a.csv", tenant=routed)
    assert o.kind == "committed" and o.finalize_error is None and o.transfer is not None
    t = journal.get_transfer(o.transfer.id)
    assert t is not None and (t.user, t.source, t.path) == (DROP_USER, f"dropfolder:{io.root}", "/x/a.csv")
    assert t.sha256 == hashlib.sha256(b"1,2\n").hexdigest()
    assert [d.destination for d in journal.deliveries_of(t.id)] == ["d"]
    assert (_inbox(io) / "x" / "a.csv").read_bytes() == b"1,2\n"
    assert not (tmp_path / "drop" / "x" / "a.csv").exists()           # removed after the commit
    assert journal.dropped_paths(io.root) == set()                     # and its record with it
    assert os.listdir(io.spool.dirs("acme").incoming) == []


def test_keep_copies_and_never_takes_the_same_file_twice(tmp_path: Path, journal: Journal) -> None:
    io = _io(tmp_path, journal, after="keep")
    f = tmp_path / "drop" / "a.csv"
    f.write_bytes(b"v1")
    [o] = _take(io, "a.csv")
    assert o.kind == "committed" and f.read_bytes() == b"v1"
    assert os.stat(f).st_ino != os.stat(_inbox(io) / "a.csv").st_ino  # a copy: later edits can't reach it
    [o] = _take(io, "a.csv")
    assert o.kind == "duplicate" and o.detail == journal.list_transfers()[0].id
    # Same name, size and mtime but another inode (a copy with preserved times): still the same file.
    st = os.stat(f)
    os.rename(f, tmp_path / "old")
    (tmp_path / "drop" / "a.csv").write_bytes(b"v1")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _take(io, "a.csv")[0].kind == "duplicate"
    # Same size and mtime, other content: the digest tells, it is taken again.
    f.write_bytes(b"v2")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    [o] = _take(io, "a.csv")
    assert o.kind == "committed" and len(journal.list_transfers()) == 2
    assert (_inbox(io) / "a.csv").read_bytes() == b"v2"


def test_a_commit_whose_original_was_not_removed_yet_is_finished_not_repeated(tmp_path: Path,
                                                                             journal: Journal) -> None:
    """What a crash between the commit and the removal leaves: the original plus its record."""
    keep = _io(tmp_path, journal, after="keep")
    (tmp_path / "drop" / "a.csv").write_bytes(b"data")
    assert _take(keep, "a.csv")[0].kind == "committed"
    delete = dataclasses.replace(keep, cfg=dataclasses.replace(keep.cfg, after="delete"))
    look = Look(rel="a.csv", gen=0, closed=True, ident=None)
    [o] = worker.probe(delete, [look])
    assert o.kind == "duplicate" and o.finalize_error is None
    assert not (tmp_path / "drop" / "a.csv").exists() and len(journal.list_transfers()) == 1
    assert journal.dropped_paths(delete.root) == set()


def test_move_after_commit_keeps_both_names(tmp_path: Path, journal: Journal) -> None:
    done = tmp_path / "done"
    done.mkdir()
    io = _io(tmp_path, journal, after="move", move_to=done)
    (tmp_path / "drop" / "s").mkdir()
    (tmp_path / "drop" / "s" / "a.csv").write_bytes(b"one")
    (done / "s").mkdir()
    (done / "s" / "a.csv").write_bytes(b"earlier")
    [o] = _take(io, "s/a.csv")
    assert o.kind == "committed" and o.transfer is not None
    assert (done / "s" / "a.csv").read_bytes() == b"earlier"
    assert (done / "s" / f"a.csv.{o.transfer.id}").read_bytes() == b"one"
    assert not (tmp_path / "drop" / "s" / "a.csv").exists()


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs a second file system (/dev/shm)")
def test_across_file_systems_copy_verify_then_remove(tmp_path: Path, journal: Journal) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        drop = Path(shm) / "drop"
        io = _io(tmp_path, journal, drop=drop)
        (drop / "a.bin").write_bytes(os.urandom(3 << 20))
        want = hashlib.sha256((drop / "a.bin").read_bytes()).hexdigest()
        [o] = _take(io, "a.bin")
        assert o.kind == "committed" and o.transfer is not None and o.transfer.sha256 == want
        assert not (drop / "a.bin").exists()
        assert hashlib.sha256((_inbox(io) / "a.bin").read_bytes()).hexdigest() == want
        # moving the original across file systems: copy, fsync, verify, then unlink
        moved = _io(tmp_path, journal, drop=drop, after="move", move_to=tmp_path)
        (drop / "b.bin").write_bytes(b"b" * 100_000)
        [o] = _take(moved, "b.bin")
        assert o.kind == "committed" and o.finalize_error is None
        assert (tmp_path / "b.bin").read_bytes() == b"b" * 100_000 and not (drop / "b.bin").exists()


def test_changed_or_vanished_while_being_read_is_not_committed(tmp_path: Path, journal: Journal,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    io = _io(tmp_path, journal, after="keep")
    real_stage = worker._stage
    action: dict[str, Any] = {}

    def stage_then_interfere(*args: Any) -> Any:
        got = real_stage(*args)
        action["do"]()
        return got
    monkeypatch.setattr(worker, "_stage", stage_then_interfere)
    f = tmp_path / "drop" / "a.csv"
    f.write_bytes(b"12345")
    action["do"] = lambda: f.open("ab").write(b"6")
    assert _take(io, "a.csv")[0].kind == "changed"
    action["do"] = f.unlink
    [o] = _take(io, "a.csv")
    assert (o.kind, o.detail) == ("gone", "vanished while being read")
    assert journal.list_transfers() == [] and os.listdir(io.spool.dirs("acme").incoming) == []


def test_symlinks_and_special_files_are_never_taken(tmp_path: Path, journal: Journal) -> None:
    io = _io(tmp_path, journal)
    secret = tmp_path / "secret"
    secret.write_text("do not take")
    drop = tmp_path / "drop"
    (drop / "out.csv").symlink_to(secret)
    (drop / "in.csv").write_text("x")
    (drop / "alias.csv").symlink_to(drop / "in.csv")
    (drop / "dir").symlink_to(tmp_path)
    os.mkfifo(drop / "pipe.csv")
    (drop / ".hidden").mkdir()
    (drop / ".hidden" / "h.csv").write_text("h")
    (drop / "t.csv.part").write_text("p")
    result = worker.scan(io, Selector(io.cfg))
    assert set(result.files) == {"in.csv"}
    assert result.problems == {"out.csv": "symlink pointing outside the drop folder, not followed",
                               "alias.csv": "symlink, not followed",
                               "dir": "symlink pointing outside the drop folder, not followed",
                               "pipe.csv": "not a regular file"}
    looks = [Look(rel=r, gen=0, closed=True, ident=None) for r in ("out.csv", "pipe.csv")]
    assert [o.kind for o in worker.probe(io, looks)] == ["skipped", "skipped"]
    [o] = worker.ingest(io, ACME, [(looks[0], (11, 0, 0, 0))])
    assert o.kind == "skipped" and secret.read_text() == "do not take" and journal.list_transfers() == []


def test_prune_drops_records_of_originals_that_are_gone(tmp_path: Path, journal: Journal) -> None:
    io = _io(tmp_path, journal, after="keep")
    for name in ("a", "b"):
        (tmp_path / "drop" / name).write_text(name)
    _take(io, "a", "b")
    (tmp_path / "drop" / "a").unlink()
    assert worker.prune(io) == 1 and journal.dropped_paths(io.root) == {"b"}
