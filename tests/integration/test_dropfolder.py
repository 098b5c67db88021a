"""Drop folders against a real ``relayd serve`` on real folders: settling, exactly-once across
kill -9 and restarts, the commit door (manifest, routes, quota), bad files, folders that vanish,
reload and stop. Waits are conditions with deadlines; a "not taken" is always checked after a
witness file dropped later was taken."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from relayd.journal import Journal, Transfer
from tests.helpers import REPO, Daemon, base_config, free_port, relayd, run_daemon, start_daemon, wait_for


def _config(tmp: Path, folders: list[dict[str, Any]], tenants: dict[str, Any] | None = None,
            destinations: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = base_config(tmp, free_port(), tenants if tenants is not None else {"acme": {}})
    cfg["dropfolders"] = folders
    if destinations:
        cfg["destinations"] = destinations
    return cfg


def _folder(path: Path, **kw: Any) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    return {"path": str(path), "tenant": "acme", "settle": "1s", "rescan": "1s", **kw}


def _transfers(d: Daemon, tenant: str = "acme") -> list[Transfer]:
    j = Journal.open(Path(d.config["node"]["state_dir"]) / "journal.db", readonly=True)
    try:
        return j.list_transfers(tenant=tenant)
    finally:
        j.close()


def _paths(d: Daemon) -> list[str]:
    return [t.path for t in _transfers(d)]


def _wait_taken(d: Daemon, *paths: str, timeout: float = 20) -> list[Transfer]:
    """Wait until each inbox path has a transfer; the transfers of those paths."""
    def done() -> list[Transfer] | None:
        got = [t for t in _transfers(d) if t.path in paths]
        return got if {t.path for t in got} >= set(paths) else None
    return wait_for(done, timeout, what=f"transfers of {paths}")


def _wait_log(d: Daemon, text: str, timeout: float = 20, count: int = 1) -> None:
    wait_for(lambda: d.log().count(text) >= count, timeout, what=f"log line {text!r}")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _restart(d: Daemon, config: dict[str, Any] | None = None, **kw: Any) -> Daemon:
    return start_daemon(d.workdir, config or d.config, **kw)


@pytest.fixture
def stop_all() -> Iterator[list[Daemon]]:
    """Daemons started in a test body; killed at the end whatever happened."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


# --------------------------------------------------------------------------------------------
# Config


def test_missing_drop_folder_or_move_target_is_a_config_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, [{"path": str(tmp_path / "nope"), "tenant": "acme"}])
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    check = relayd("check-config", "-c", str(path))
    assert check.returncode == 2 and "Traceback" not in check.stderr
    assert _error_lines(check.stderr) == [f"dropfolders[0].path: folder does not exist: {tmp_path / 'nope'}"]
    proc = relayd("serve", "-c", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [f"dropfolders[0].path: folder does not exist: {tmp_path / 'nope'}"]
    assert not (tmp_path / "state").exists(), "nothing may be touched before the config is valid"
    (tmp_path / "drop").mkdir()
    cfg["dropfolders"] = [{"path": str(tmp_path / "drop"), "tenant": "acme", "after": f"move:{tmp_path / 'done'}"}]
    path.write_text(yaml.safe_dump(cfg))
    proc = relayd("serve", "-c", str(path))
    assert (proc.returncode, _error_lines(proc.stderr)) == (
        2, [f"dropfolders[0].after: move target does not exist: {tmp_path / 'done'}"])


def _error_lines(stderr: str) -> list[str]:
    """The config error lines of ``relayd serve`` (serve may prefix them like log lines)."""
    return [line[line.index("dropfolders["):] for line in stderr.splitlines() if "dropfolders[" in line]


# --------------------------------------------------------------------------------------------
# The commit door


def test_dropped_file_is_committed_routed_delivered_then_removed(tmp_path: Path) -> None:
    drop, out = tmp_path / "drop", tmp_path / "out"
    out.mkdir()
    cfg = _config(tmp_path, [_folder(drop, pattern="**/*.csv", recursive=True, into="/legacy")],
                  tenants={"acme": {"routes": [{"match": "legacy/**/*.csv", "to": ["archive"]}]}},
                  destinations={"archive": {"type": "local", "path": str(out)}})
    with run_daemon(tmp_path, cfg) as d:
        # names that are never taken, dropped first (the witness below is taken later)
        for name in ("notes.txt", ".hidden.csv", "x.csv.part", "y.csv.tmp", ".git/z.csv"):
            _write(drop / name, b"ignored")
        data = b"id,amount\n1,2\n"
        _write(drop / "in" / "2024" / "a.csv", data)
        [t] = _wait_taken(d, "/legacy/in/2024/a.csv")
        assert (t.user, t.source, t.size, t.sha256) == ("dropfolder", f"dropfolder:{os.path.realpath(drop)}",
                                                        len(data), _sha(data))
        inbox = d.inbox("acme") / "legacy" / "in" / "2024" / "a.csv"
        assert inbox.read_bytes() == data
        wait_for(lambda: not (drop / "in" / "2024" / "a.csv").exists(), what="original removed")
        wait_for(lambda: (out / "legacy" / "in" / "2024" / "a.csv").exists(), 10, what="delivery")
        assert (out / "legacy" / "in" / "2024" / "a.csv").read_bytes() == data
        [row] = [r for r in d.transfers() if r["id"] == t.id]      # what `relayd transfers` shows
        assert row["user"] == "dropfolder" and row["deliveries"][0]["state"] == "delivered"
        assert _paths(d) == ["/legacy/in/2024/a.csv"]
        for name in ("notes.txt", ".hidden.csv", "x.csv.part", "y.csv.tmp", ".git/z.csv"):
            assert (drop / name).read_bytes() == b"ignored"
        os.rename(drop / "x.csv.part", drop / "x.csv")             # a temp name renamed: taken now
        _wait_taken(d, "/legacy/x.csv")
        manifest = tmp_path / "a.csv.relayd.json"                 # the signed manifest checks out offline
        relayd("manifest", "-c", str(d.config_path), "-o", str(manifest), t.id, check=True)
        relayd("verify", "--manifest", str(manifest), "--keys", cfg["node"]["state_dir"] + "/signing", str(inbox),
               check=True)


def test_move_after_commit(tmp_path: Path) -> None:
    drop, done = tmp_path / "drop", tmp_path / "done"
    (done / "sub").mkdir(parents=True)
    _write(done / "sub" / "a.csv", b"an older a.csv")
    with run_daemon(tmp_path, _config(tmp_path, [_folder(drop, recursive=True, after=f"move:{done}")])) as d:
        _write(drop / "sub" / "a.csv", b"new")
        [t] = _wait_taken(d, "/sub/a.csv")
        wait_for(lambda: not (drop / "sub" / "a.csv").exists(), what="original moved")
        assert (done / "sub" / "a.csv").read_bytes() == b"an older a.csv"    # never overwritten
        assert (done / "sub" / f"a.csv.{t.id}").read_bytes() == b"new"


# --------------------------------------------------------------------------------------------
# Complete files only


def test_file_still_being_written_is_never_taken_early(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    with run_daemon(tmp_path, _config(tmp_path, [_folder(drop, settle="1s")])) as d:
        chunks = [os.urandom(1024) for _ in range(14)]
        started = threading.Event()

        def slow_writer() -> None:  # keeps the file open, pauses 0.25s (< settle) between writes
            with open(drop / "slow.dat", "wb") as f:
                started.set()
                for c in chunks:
                    f.write(c)
                    f.flush()
                    time.sleep(0.25)
        writer = threading.Thread(target=slow_writer)
        writer.start()
        started.wait(5)
        while writer.is_alive():
            assert "/slow.dat" not in _paths(d), "taken while still being written"
            time.sleep(0.05)
        [t] = _wait_taken(d, "/slow.dat")
        assert (t.size, t.sha256) == (len(b"".join(chunks)), _sha(b"".join(chunks)))
        # No close-after-write event at all (a hard link appears whole): size and mtime must stay
        # the same for `settle` first.
        outside = _write(tmp_path / "outside.dat", b"linked in")
        linked_at = time.time()
        os.link(outside, drop / "linked.dat")
        [t] = _wait_taken(d, "/linked.dat")
        received = datetime.fromisoformat(t.received_at.replace("Z", "+00:00")).timestamp()
        assert received - linked_at >= 1.0, "taken before it was unchanged for settle"
        assert _paths(d).count("/slow.dat") == 1


# --------------------------------------------------------------------------------------------
# Exactly once


def test_ten_thousand_files_dropped_at_once_are_each_taken_once(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    n = 10_000
    with run_daemon(tmp_path, _config(tmp_path, [_folder(drop, settle="2s", rescan="10s")])) as d:
        for i in range(n):
            _write(drop / f"f{i:05d}.dat", f"file {i}\n".encode() * 8)
        wait_for(lambda: len(_transfers(d)) >= n and not any(os.scandir(drop)), 120, interval=0.5,
                 what="10,000 files taken and removed")
        paths = _paths(d)
        assert len(paths) == n and len(set(paths)) == n
        inbox = d.inbox("acme")
        assert all((inbox / f"f{i:05d}.dat").read_bytes() == f"file {i}\n".encode() * 8 for i in range(0, n, 97))


def test_kill_9_midway_then_restart_takes_each_file_exactly_once(tmp_path: Path, stop_all: list[Daemon]) -> None:
    drop = tmp_path / "drop"
    n = 3000
    cfg = _config(tmp_path, [_folder(drop, settle="1s", rescan="5s")])
    d = start_daemon(tmp_path, cfg)
    stop_all.append(d)
    for i in range(n):
        _write(drop / f"f{i:04d}.dat", f"{i}:".encode() * 512)
    wait_for(lambda: len(_transfers(d)) >= n // 5, 60, what="a fifth committed")
    d.kill9()
    before = len(_transfers(d))
    assert before < n, "all done before the kill; nothing was tested"
    d = _restart(d)
    stop_all.append(d)
    wait_for(lambda: len(_transfers(d)) >= n and not any(os.scandir(drop)), 90, interval=0.2,
             what="all files taken after the restart")
    paths = _paths(d)
    assert len(set(paths)) == n, "some file was never taken"
    assert len(paths) == n, f"{len(paths) - n} file(s) taken twice"
    inbox = d.inbox("acme")
    assert all((inbox / f"f{i:04d}.dat").read_bytes() == f"{i}:".encode() * 512 for i in range(n))
    assert os.listdir(d.spool / "acme" / "incoming") == []


def test_sigterm_midway_stops_cleanly_and_the_rest_is_taken_after_the_restart(tmp_path: Path,
                                                                              stop_all: list[Daemon]) -> None:
    drop = tmp_path / "drop"
    n = 1500
    d = start_daemon(tmp_path, _config(tmp_path, [_folder(drop, settle="1s", rescan="5s")]))
    stop_all.append(d)
    for i in range(n):
        _write(drop / f"f{i:04d}.dat", f"{i}".encode() * 100)
    wait_for(lambda: len(_transfers(d)) >= 100, 60, what="some committed")
    t0 = time.monotonic()
    assert d.stop() == 0 and time.monotonic() - t0 < 10
    assert "dropfolders: stopped" in d.log()
    d = _restart(d)
    stop_all.append(d)
    wait_for(lambda: len(_transfers(d)) >= n and not any(os.scandir(drop)), 60, interval=0.2,
             what="the rest taken after the restart")
    paths = _paths(d)
    assert len(paths) == n and len(set(paths)) == n


def test_keep_mode_never_takes_an_unchanged_file_again_but_takes_a_changed_one(tmp_path: Path,
                                                                              stop_all: list[Daemon]) -> None:
    drop = tmp_path / "drop"
    cfg = _config(tmp_path, [_folder(drop, after="keep", settle="0.5s")])
    d = start_daemon(tmp_path, cfg)
    stop_all.append(d)
    _write(drop / "a.csv", b"v1")
    _write(drop / "b.csv", b"b")
    _wait_taken(d, "/a.csv", "/b.csv")
    assert d.stop() == 0 and "dropfolders: stopped" in d.log()     # SIGTERM: a clean stop
    d = _restart(d)
    stop_all.append(d)
    for name in ("a.csv", "b.csv"):
        _wait_log(d, f"path={name}: already committed as transfer=")
    assert sorted(_paths(d)) == ["/a.csv", "/b.csv"]
    with open(drop / "a.csv", "ab") as f:
        f.write(b" and v2")
    wait_for(lambda: _paths(d).count("/a.csv") == 2, what="the changed file taken again")
    assert _transfers(d)[-1].sha256 == _sha(b"v1 and v2")
    assert (drop / "a.csv").read_bytes() == b"v1 and v2" and (drop / "b.csv").exists()
    d.kill9()
    d = _restart(d)
    stop_all.append(d)
    _wait_log(d, "path=a.csv: already committed as transfer=")
    _wait_log(d, "path=b.csv: already committed as transfer=")
    assert sorted(_paths(d)) == ["/a.csv", "/a.csv", "/b.csv"]


def test_original_left_behind_by_a_crash_is_removed_not_taken_again(tmp_path: Path,
                                                                    stop_all: list[Daemon]) -> None:
    """The state a crash between commit and removal leaves: committed, original still there."""
    drop = tmp_path / "drop"
    cfg = _config(tmp_path, [_folder(drop, after="keep", settle="0.5s")])
    d = start_daemon(tmp_path, cfg)
    stop_all.append(d)
    _write(drop / "a.csv", b"once")
    _wait_taken(d, "/a.csv")
    d.kill9()
    cfg["dropfolders"][0]["after"] = "delete"
    d = _restart(d, cfg)
    stop_all.append(d)
    wait_for(lambda: not (drop / "a.csv").exists(), what="original removed")
    assert _paths(d) == ["/a.csv"]


# --------------------------------------------------------------------------------------------
# Bad files never stop the watcher


def _start_without_dac_override(workdir: Path, config: dict[str, Any]) -> Daemon:
    """``start_daemon``, but as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so that file
    modes bind it like any user (a mode 000 file is unreadable)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "relayd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / f"relayd-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "relayd.cli", "serve", "-c", str(config_path),
                                 "--log-level", "debug"], stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    d = Daemon(config_path=config_path, port=int(config["gateway"]["listen"][0].rsplit(":", 1)[1]), proc=proc,
               log_path=log_path, workdir=workdir, config=config)
    wait_for(lambda: proc.poll() is None and "relayd ready" in d.log() or proc.poll() is not None, 30,
             what="relayd ready")
    assert proc.poll() is None, d.log()
    return d


def test_unreadable_files_and_symlinks_are_logged_skipped_and_retried(tmp_path: Path,
                                                                       stop_all: list[Daemon]) -> None:
    drop = tmp_path / "drop"
    secret = _write(tmp_path / "secret.csv", b"outside the drop folder")
    d = _start_without_dac_override(tmp_path, _config(tmp_path, [_folder(drop, settle="0.5s")]))
    stop_all.append(d)
    os.chmod(_write(drop / "locked.csv", b"later"), 0)
    (drop / "escape.csv").symlink_to(secret)
    (drop / "inside.csv").symlink_to(drop / "ok.csv")
    _write(drop / "ok.csv", b"fine")
    _wait_taken(d, "/ok.csv")                                         # the watcher goes on
    _wait_log(d, "path=locked.csv: cannot open: Permission denied; skipped, tried again later")
    _wait_log(d, "path=escape.csv: symlink pointing outside the drop folder, not followed")
    _wait_log(d, "path=inside.csv: symlink, not followed")
    assert d.log().count("path=locked.csv: cannot open") == 1          # logged once, retried quietly
    os.chmod(drop / "locked.csv", 0o644)
    _wait_taken(d, "/locked.csv")                                     # retried later: taken
    _write(drop / "witness.csv", b"w")
    _wait_taken(d, "/witness.csv")
    assert sorted(_paths(d)) == ["/locked.csv", "/ok.csv", "/witness.csv"]
    assert secret.read_bytes() == b"outside the drop folder" and (drop / "escape.csv").is_symlink()


def test_file_vanishing_or_changing_mid_read_is_skipped_and_retried(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    with run_daemon(tmp_path, _config(tmp_path, [_folder(drop, settle="0.5s")]),
                    env={"RELAYD_FAULTS": "dropfolder-read-pause"}) as d:
        _write(drop / "gone.csv", b"x" * 10_000)
        _wait_log(d, "paused reading dropfolder=")  # the fault holds the read for 1.5s
        (drop / "gone.csv").unlink()
        _wait_log(d, "path=gone.csv: vanished while being read; skipped")
        _write(drop / "grows.csv", b"first part ")
        _wait_log(d, "paused reading dropfolder=", count=2)
        with open(drop / "grows.csv", "ab") as f:
            f.write(b"and the rest")
        _wait_log(d, "path=grows.csv: changed while being taken; waiting for it to settle")
        [t] = _wait_taken(d, "/grows.csv")
        assert t.sha256 == _sha(b"first part and the rest")
        assert _paths(d) == ["/grows.csv"]


def test_quota_refusal_waits_and_nothing_is_lost(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    cfg = _config(tmp_path, [_folder(drop, settle="0.5s")], tenants={"acme": {"quota": {"files": 2}}})
    with run_daemon(tmp_path, cfg) as d:
        for name in ("a", "b", "c"):
            _write(drop / f"{name}.csv", name.encode())
        wait_for(lambda: len(_transfers(d)) == 2, what="two within quota")
        _wait_log(d, "not taken yet: Quota exceeded: tenant file quota is 2 files; it stays and is tried again")
        left = [p.name for p in drop.iterdir()]
        assert len(left) == 1                                         # still in the drop folder
        cfg["tenants"]["acme"]["quota"]["files"] = 10
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(_transfers(d)) == 3, what="the third after the quota grew")
        assert sorted(_paths(d)) == ["/a.csv", "/b.csv", "/c.csv"]


# --------------------------------------------------------------------------------------------
# Folders come and go; events get lost; reload; stop


def test_rescan_takes_what_events_missed(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    with run_daemon(tmp_path, _config(tmp_path, [_folder(drop, settle="0.5s", rescan="1s")]),
                    env={"RELAYD_FAULTS": "dropfolder-no-events"}) as d:
        _write(drop / "sub.csv", b"seen by a rescan only")
        _wait_taken(d, "/sub.csv")


def test_folder_that_disappears_raises_an_alert_and_is_watched_again(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = _config(tmp_path, [_folder(a, into="/a"), _folder(b, into="/b")])
    with run_daemon(tmp_path, cfg) as d:
        _wait_log(d, f"dropfolder={a}: watching")
        shutil.rmtree(a)
        _wait_log(d, f"ALERT dropfolder={a} disappeared")
        _write(b / "1.csv", b"b still works")
        _wait_taken(d, "/b/1.csv")
        a.mkdir()
        _wait_log(d, f"dropfolder={a} is back; watching it again")
        _write(a / "2.csv", b"a again")
        _wait_taken(d, "/a/2.csv")
        os.rename(a, tmp_path / "a.old")                              # moved away: no event tells
        a.mkdir()
        _wait_log(d, f"ALERT dropfolder={a} was replaced by another folder")
        _wait_log(d, f"dropfolder={a} is back; watching it again", count=2)
        _write(tmp_path / "a.old" / "3.csv", b"not watched")
        _write(a / "4.csv", b"the new a")
        _wait_taken(d, "/a/4.csv")
        assert "/a/3.csv" not in _paths(d)


def test_reload_adds_and_removes_folders_and_rejects_a_missing_one(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = _config(tmp_path, [_folder(a, into="/a")])
    with run_daemon(tmp_path, cfg) as d:
        cfg["dropfolders"].append(_folder(b, into="/b"))
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        _wait_log(d, f"dropfolder={b}: watching")
        _write(b / "1.csv", b"1")
        _wait_taken(d, "/b/1.csv")
        cfg["dropfolders"] = [cfg["dropfolders"][1]]
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        _wait_log(d, f"dropfolder={a}: no longer watched (removed from the config)")
        _write(a / "2.csv", b"2")
        _write(b / "3.csv", b"3")
        _wait_taken(d, "/b/3.csv")
        assert "/a/2.csv" not in _paths(d) and (a / "2.csv").exists()
        cfg["dropfolders"].append({"path": str(tmp_path / "missing"), "tenant": "acme"})
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        _wait_log(d, f"reload rejected, keeping the old config: dropfolders[1].path: folder does not exist: "
                     f"{tmp_path / 'missing'}")
        _write(b / "4.csv", b"4")
        _wait_taken(d, "/b/4.csv")
        assert d.stop() == 0 and "dropfolders: stopped" in d.log()
