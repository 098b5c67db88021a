"""Relay engine end to end against a real OpenSSH sshd (tests/sshd.py) as the remote cloud.

Each test runs its own relayd subprocess and its own throwaway sshd on 127.0.0.1, both rooted in
``tmp_path``. Files are uploaded into relayd with OpenSSH ``sftp -b``; progress is read from
``relayd transfers --json``; the "remote" side is inspected directly on disk (the throwaway sshd
logs in as the current user on this host, so its paths are ours).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import two_tenants
from tests.helpers import (Daemon, Key, base_config, free_port, make_file, make_key, relayd, run_daemon,
                           sha256_file, wait_for)
from tests.sshd import ThrowawaySshd, throwaway_sshd

MiB = 1 << 20
FAST_RETRY = {"retry_initial": "0.2s", "retry_max": "1s"}


# --- helpers --------------------------------------------------------------------------------------

def _sftp_dest(srv: ThrowawaySshd, key: Key, remote: Path, known_hosts: Path, **extra: Any) -> dict[str, Any]:
    """An ``sftp`` destination config for the throwaway sshd ``srv`` (fast retries)."""
    return {"type": "sftp", "host": "127.0.0.1", "port": srv.port, "user": srv.user, "identity": str(key.path),
            "known_hosts": str(known_hosts), "path": str(remote), **FAST_RETRY, **extra}


def _config(tmp_path: Path, keys: dict[str, Key], port: int, destinations: dict[str, Any]) -> dict[str, Any]:
    """Two tenants; every acme file is routed to all ``destinations``."""
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": sorted(destinations)}]))
    cfg["destinations"] = destinations
    return cfg


def _transfers_at(d: Daemon, path: str) -> list[dict[str, Any]]:
    """All journal transfers for ``path`` (oldest first)."""
    return [t for t in d.transfers() if t["path"] == path]


def _delivery(d: Daemon, path: str, dest: str, index: int = -1) -> dict[str, Any] | None:
    """The delivery to ``dest`` of the ``index``-th transfer at ``path`` (default: the newest)."""
    rows = _transfers_at(d, path)
    if not rows:
        return None
    for x in rows[index]["deliveries"]:
        if x["destination"] == dest:
            return x
    return None


def _all_delivered(d: Daemon, count: int) -> list[dict[str, Any]] | None:
    """Every transfer (``count`` of them) has every delivery ``delivered``; else None."""
    rows = d.transfers()
    if len(rows) != count:
        return None
    if all(t["deliveries"] and all(x["state"] == "delivered" for x in t["deliveries"]) for t in rows):
        return rows
    return None


def _files(root: Path) -> list[Path]:
    """Regular files under ``root`` (recursively, hidden ones included), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _parts(*roots: Path) -> list[Path]:
    """Leftover ``.part`` temp files under ``roots``."""
    return [p for r in roots for p in _files(r) if p.name.endswith(".part")]


def _put(d: Daemon, key: Key, user: str, pairs: list[tuple[Path, str]]) -> None:
    """Upload local files to relayd in one ``sftp -b`` batch (creating remote folders)."""
    dirs = sorted({os.path.dirname(r) for _, r in pairs} - {"/", ""})
    cmds = "".join(f"-mkdir {x}\n" for x in dirs) + "".join(f"put {src} {dst}\n" for src, dst in pairs)
    r = d.sftp(key, user, cmds)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def _remote(tmp_path: Path, key: Key, **kw: Any) -> Iterator[ThrowawaySshd]:
    """A throwaway sshd in ``tmp_path/sshd`` accepting ``key``."""
    with throwaway_sshd(tmp_path / "sshd", authorized_keys=[key.pub], **kw) as srv:
        yield srv


# --- tests ----------------------------------------------------------------------------------------

def test_fan_out_sftp_and_local(tmp_path: Path, keys: dict[str, Key]) -> None:
    """One upload reaches an sftp and a local destination; both verified by sha256, no temp files."""
    relay_key = make_key(tmp_path / "k", "relay")
    remote, archive = tmp_path / "remote", tmp_path / "archive"
    with _remote(tmp_path, relay_key) as srv:
        port = free_port()
        cfg = _config(tmp_path, keys, port, {
            "cloud": _sftp_dest(srv, relay_key, remote / "{tenant}", srv.known_hosts_path),
            "arch": {"type": "local", "path": str(archive / "{tenant}")},
        })
        with run_daemon(tmp_path / "d", cfg) as d:
            src = make_file(tmp_path / "f.bin", 3 * MiB + 17, seed=1)
            _put(d, keys["acme"], "acme-erp", [(src, "/sub/f.bin")])
            rows = wait_for(lambda: _all_delivered(d, 1), 30, interval=0.1, what="both deliveries delivered")
            t = rows[0]
            assert t["sha256"] == sha256_file(src)
            by_dest = {x["destination"]: x for x in t["deliveries"]}
            assert set(by_dest) == {"cloud", "arch"}
            cloud = by_dest["cloud"]
            assert cloud["remote_path"] == str(remote / "acme/sub/f.bin")
            assert cloud["verified"] == "sha256" and cloud["remote_digest"] == t["sha256"]
            assert cloud["bytes_sent"] == src.stat().st_size and cloud["attempts"] == 1
            assert by_dest["arch"]["verified"] == "sha256" and by_dest["arch"]["remote_digest"] == t["sha256"]
            assert _files(remote) == [remote / "acme/sub/f.bin"]
            assert _files(archive) == [archive / "acme/sub/f.bin"]
            assert sha256_file(remote / "acme/sub/f.bin") == t["sha256"] == sha256_file(archive / "acme/sub/f.bin")
            assert not _parts(remote, archive)


def test_host_key_mismatch_refused_then_fixed(tmp_path: Path, keys: dict[str, Key]) -> None:
    """A wrong pinned host key: never delivered, error names the host key, ALERT logged; fixing
    known_hosts (config unchanged) and ``relayd retry`` delivers."""
    relay_key = make_key(tmp_path / "k", "relay")
    impostor = make_key(tmp_path / "k", "impostor")
    remote = tmp_path / "remote"
    known_hosts = tmp_path / "known_hosts"
    with _remote(tmp_path, relay_key) as srv:
        kind, blob = impostor.pub.split()[:2]
        known_hosts.write_text(f"[127.0.0.1]:{srv.port} {kind} {blob}\n")
        port = free_port()
        cfg = _config(tmp_path, keys, port, {
            "cloud": _sftp_dest(srv, relay_key, remote, known_hosts, max_attempts=2)})
        with run_daemon(tmp_path / "d", cfg) as d:
            src = make_file(tmp_path / "h.bin", 5000, seed=2)
            _put(d, keys["acme"], "acme-erp", [(src, "/h.bin")])

            def failed() -> dict[str, Any] | None:
                x = _delivery(d, "/h.bin", "cloud")
                assert x is None or x["state"] != "delivered", "delivered despite a wrong pinned host key"
                return x if x is not None and x["state"] == "failed" else None

            row = wait_for(failed, 30, interval=0.1, what="delivery failed after max_attempts")
            assert row["attempts"] == 2
            assert "host key" in (row["last_error"] or "").lower(), row["last_error"]
            assert any("ALERT" in line and "host key" in line for line in d.log().splitlines()), d.log()
            assert not _files(remote)
            assert "Accepted publickey" not in srv.log()

            known_hosts.write_text(srv.known_hosts_line() + "\n")
            r = relayd("retry", "-c", str(d.config_path), row["id"])
            assert r.returncode == 0, r.stderr
            done = wait_for(lambda: (x := _delivery(d, "/h.bin", "cloud")) and x["state"] == "delivered" and x,
                            30, interval=0.1, what="delivered after fixing known_hosts")
            assert done["remote_digest"] == sha256_file(src) == sha256_file(remote / "h.bin")
            assert not _parts(remote)


def test_remote_down_then_up(tmp_path: Path, keys: dict[str, Key]) -> None:
    """sshd stopped: deliveries wait in retry_wait with growing attempts; sshd back on the same port
    (same host key) → everything delivered, including through a pool whose connection died."""
    relay_key = make_key(tmp_path / "k", "relay")
    remote = tmp_path / "remote"
    with _remote(tmp_path, relay_key) as srv:
        port = free_port()
        cfg = _config(tmp_path, keys, port, {
            "cloud": _sftp_dest(srv, relay_key, remote, srv.known_hosts_path)})
        with run_daemon(tmp_path / "d", cfg) as d:
            first = make_file(tmp_path / "first.bin", 20_000, seed=3)
            _put(d, keys["acme"], "acme-erp", [(first, "/first.bin")])
            wait_for(lambda: _all_delivered(d, 1), 30, interval=0.1, what="first file delivered")

            srv.stop()
            srcs = [make_file(tmp_path / f"down{i}.bin", 10_000 + i, seed=10 + i) for i in range(4)]
            _put(d, keys["acme"], "acme-erp", [(s, f"/later/{s.name}") for s in srcs])

            def waiting(min_attempts: int) -> list[dict[str, Any]] | None:
                rows = [x for t in d.transfers() if t["path"].startswith("/later/") for x in t["deliveries"]]
                assert not any(x["state"] == "delivered" for x in rows), "delivered while sshd was down"
                ok = len(rows) == 4 and all(x["attempts"] >= min_attempts for x in rows) and \
                    any(x["state"] == "retry_wait" for x in rows)
                return rows if ok else None

            rows = wait_for(lambda: waiting(1), 30, interval=0.1, what="deliveries in retry_wait")
            assert all(x["last_error"] for x in rows if x["state"] == "retry_wait")
            seen = max(x["attempts"] for x in rows)
            wait_for(lambda: waiting(seen + 1), 30, interval=0.1, what="attempts growing while down")
            assert not [p for p in _files(remote) if "/later" in str(p)]

            with _remote(tmp_path, relay_key, port=srv.port) as back:
                assert back.host_key_pub == srv.host_key_pub
                rows = wait_for(lambda: _all_delivered(d, 5), 30, interval=0.1, what="all delivered after sshd up")
                for t in rows:
                    x = t["deliveries"][0]
                    assert x["verified"] == "sha256" and x["remote_digest"] == t["sha256"]
                    assert sha256_file(Path(x["remote_path"])) == t["sha256"]
                assert sorted(p.name for p in _files(remote / "later")) == sorted(s.name for s in srcs)
                assert not _parts(remote)


@pytest.mark.slow
def test_kill9_mid_delivery_resumes(tmp_path: Path, keys: dict[str, Key]) -> None:
    """kill -9 while a 200 MiB file is being written to the remote ``.part``: after a restart the
    delivery resumes from the temp file and publishes exactly one correct file."""
    relay_key = make_key(tmp_path / "k", "relay")
    remote = tmp_path / "remote"
    size = 200 * MiB
    with _remote(tmp_path, relay_key) as srv:
        port = free_port()
        cfg = _config(tmp_path, keys, port, {
            "cloud": _sftp_dest(srv, relay_key, remote, srv.known_hosts_path, concurrency=1)})
        src = make_file(tmp_path / "big.bin", size, seed=4)
        digest = sha256_file(src)
        with run_daemon(tmp_path / "d", cfg) as d:
            result: dict[str, Any] = {}
            uploader = threading.Thread(
                target=lambda: result.update(r=d.sftp(keys["acme"], "acme-erp", f"put {src} /big.bin\n")))
            uploader.start()
            try:
                def part_growing() -> Path | None:
                    for p in remote.glob(".big.bin.*.part") if remote.exists() else []:
                        with contextlib.suppress(FileNotFoundError):
                            if p.stat().st_size > 32 * MiB:
                                return p
                    assert not (remote / "big.bin").exists(), "delivery finished before the kill could land"
                    return None

                part = wait_for(part_growing, 120, interval=0.002, what="remote .part beyond 32 MiB")
                d.kill9()
            finally:
                uploader.join(120)
            assert result["r"].returncode == 0, result["r"].stderr
        assert not (remote / "big.bin").exists(), "final name appeared although relayd was killed mid-delivery"
        at_kill = part.stat().st_size
        assert 0 < at_kill < size

        with run_daemon(tmp_path / "d", cfg, port=port) as d2:
            rows = wait_for(lambda: _all_delivered(d2, 1), 120, interval=0.2, what="delivered after restart")
            x = rows[0]["deliveries"][0]
            assert rows[0]["sha256"] == digest
            assert x["remote_path"] == str(remote / "big.bin") and x["attempts"] >= 2
            assert x["verified"] == "sha256" and x["remote_digest"] == digest
            assert _files(remote) == [remote / "big.bin"], _files(remote)
            assert sha256_file(remote / "big.bin") == digest
            resumed = [int(n) for n in re.findall(rf"delivered delivery={x['id']} .*?resumed_from=(\d+)", d2.log())]
            assert resumed and resumed[-1] >= at_kill > 0, f"did not resume from the temp file:\n{d2.log()[-3000:]}"
            assert x["bytes_sent"] == size - resumed[-1] < size


def test_thousand_small_files(tmp_path: Path, keys: dict[str, Key]) -> None:
    """1,000 random 1–4 KiB files uploaded in one sftp batch all reach the sftp destination intact."""
    relay_key = make_key(tmp_path / "k", "relay")
    remote = tmp_path / "remote"
    local = tmp_path / "many"
    local.mkdir()
    rnd = random.Random(5)
    for i in range(1000):
        (local / f"f{i:04d}.dat").write_bytes(rnd.randbytes(rnd.randint(1024, 4096)))
    with _remote(tmp_path, relay_key) as srv:
        port = free_port()
        cfg = _config(tmp_path, keys, port, {
            "cloud": _sftp_dest(srv, relay_key, remote / "{tenant}", srv.known_hosts_path, concurrency=8)})
        with run_daemon(tmp_path / "d", cfg) as d:
            r = d.sftp(keys["acme"], "acme-erp", "mkdir /many\ncd /many\nlcd many\nput *.dat\n", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            rows = wait_for(lambda: _all_delivered(d, 1000), 60, interval=0.5, what="1000 files delivered")
            assert not _parts(remote)
            got = {p.name: p for p in _files(remote / "acme/many")}
            assert len(got) == 1000 and set(got) == {p.name for p in local.iterdir()}
            for t in rows:
                x = t["deliveries"][0]
                name = t["path"].rsplit("/", 1)[1]
                assert x["remote_path"] == str(got[name])
                assert x["remote_digest"] == t["sha256"] == sha256_file(got[name]) == sha256_file(local / name)


def test_on_conflict_fail_then_retry(tmp_path: Path, keys: dict[str, Key]) -> None:
    """``on_conflict: fail``: a second upload of the same name fails (first remote copy untouched);
    after the remote file is removed, ``relayd retry`` delivers it."""
    relay_key = make_key(tmp_path / "k", "relay")
    remote = tmp_path / "remote"
    with _remote(tmp_path, relay_key) as srv:
        port = free_port()
        cfg = _config(tmp_path, keys, port, {
            "cloud": _sftp_dest(srv, relay_key, remote, srv.known_hosts_path, on_conflict="fail")})
        with run_daemon(tmp_path / "d", cfg) as d:
            one = make_file(tmp_path / "one.csv", 4000, seed=6)
            two = make_file(tmp_path / "two.csv", 5000, seed=7)
            _put(d, keys["acme"], "acme-erp", [(one, "/report.csv")])
            wait_for(lambda: _all_delivered(d, 1), 30, interval=0.1, what="first copy delivered")
            _put(d, keys["acme"], "acme-erp", [(two, "/report.csv")])

            def second_failed() -> dict[str, Any] | None:
                if len(_transfers_at(d, "/report.csv")) != 2:
                    return None
                x = _delivery(d, "/report.csv", "cloud")
                assert x is not None and x["state"] != "delivered", "second copy delivered over the first"
                return x if x["state"] == "failed" else None

            row = wait_for(second_failed, 30, interval=0.1, what="second delivery failed")
            assert row["last_error"] and "exists" in row["last_error"], row["last_error"]
            assert row["attempts"] == 1  # not retryable: no backoff loop
            assert _files(remote) == [remote / "report.csv"]
            assert sha256_file(remote / "report.csv") == sha256_file(one)

            (remote / "report.csv").unlink()
            r = relayd("retry", "-c", str(d.config_path), row["id"])
            assert r.returncode == 0, r.stderr
            done = wait_for(lambda: (x := _delivery(d, "/report.csv", "cloud")) and x["state"] == "delivered" and x,
                            30, interval=0.1, what="second copy delivered after relayd retry")
            assert done["remote_digest"] == sha256_file(two) == sha256_file(remote / "report.csv")
            assert _files(remote) == [remote / "report.csv"]
            first = _delivery(d, "/report.csv", "cloud", index=0)
            assert first is not None and first["state"] == "delivered"
