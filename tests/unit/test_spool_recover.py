"""Spool crash recovery: a commit cut off between the journal and the inbox rename is finished."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relayd.journal import Journal
from relayd.spool import CommitRequest, Spool


class Cut(Exception):
    """Stands for the process dying at this point."""


def _stage(spool: Spool, data: bytes) -> Path:
    path, fd = spool.new_staging("acme")
    os.write(fd, data)
    os.close(fd)
    return path


def _commit_cut_before_rename(spool: Spool, req: CommitRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a commit that dies right after the journal commit (at the rename into the inbox)."""
    def die(a: object, b: object) -> None:
        raise Cut()
    monkeypatch.setattr("relayd.spool.os.rename", die)
    with pytest.raises(Cut):
        spool.commit(req)
    monkeypatch.undo()


def _request(spool: Spool, src: Path, vpath: str, size: int) -> CommitRequest:
    target = spool.dirs("acme").inbox / vpath.lstrip("/")
    return CommitRequest(tenant="acme", user="u", source="test", path=vpath, src=src, publish_to=target, size=size)


def test_commit_cut_before_the_inbox_rename_is_published_at_recovery(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal.open(tmp_path / "journal.db")
    spool = Spool(tmp_path / "spool", journal)
    spool.ensure_tenant("acme")
    (spool.dirs("acme").inbox / "sub").mkdir()
    kept = _stage(spool, b"partial upload, never committed")
    src = _stage(spool, b"committed data")

    _commit_cut_before_rename(spool, _request(spool, src, "/sub/f.csv", 14), monkeypatch)
    assert not (spool.dirs("acme").inbox / "sub" / "f.csv").exists()
    assert len(journal.list_transfers(tenant="acme")) == 1

    result = Spool(tmp_path / "spool", journal).recover(["acme"])
    assert result["republished"] == 1 and result["partial_uploads"] == 1
    assert (spool.dirs("acme").inbox / "sub" / "f.csv").read_bytes() == b"committed data"
    assert not kept.exists() and os.listdir(spool.dirs("acme").incoming) == []


def test_cut_commit_does_not_replace_a_newer_upload_of_the_same_path(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal.open(tmp_path / "journal.db")
    spool = Spool(tmp_path / "spool", journal)
    spool.ensure_tenant("acme")
    old = _stage(spool, b"old")

    _commit_cut_before_rename(spool, _request(spool, old, "/f.csv", 3), monkeypatch)
    spool.commit(_request(spool, _stage(spool, b"newer"), "/f.csv", 5))

    result = spool.recover(["acme"])
    assert result["republished"] == 0
    assert (spool.dirs("acme").inbox / "f.csv").read_bytes() == b"newer"
    assert os.listdir(spool.dirs("acme").incoming) == []
