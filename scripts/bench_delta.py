"""``scripts/bench delta``: relayd's peer delta sync vs. the real rsync over SSH, same files.

Two relayd processes on 127.0.0.1 (a sender whose tenant routes everything to a ``relayd``
destination, a receiver with a ``peer`` user that trusts the sender's manifest key) and one
throwaway OpenSSH sshd for rsync (``rsync --no-whole-file --stats -e ssh``, same cipher).

Cases, each on its own path whose basis (a random file of ``--size``) both receivers hold first:

* ``edits``: 1% of the file overwritten in scattered 4 KiB pieces (first sync, no history);
* ``edits-again``: another 1% of scattered 4 KiB edits on top of that (repeated sync: relayd sizes
  its blocks from the changed-region count of the previous delta; rsync has no such memory);
* ``insert-front``: 1,000 bytes inserted at the front;
* ``scattered``: 256 small (1-64 byte) inserts and deletes at random places;
* ``new-data``: 64 MiB unrelated to the 64 MiB basis on the receiver (nothing matches).

Per case and tool: bytes on the wire in both directions (relayd: delta frames sent + block
signature received, from its delivery record; rsync: ``Total bytes sent/received`` of
``--stats``), seconds (relayd: commit -> delivered from the journal, which includes the
receiver's signature, rebuild, SHA-256 check and commit; rsync: wall time of the command), and the
peak RSS of the relayd sender and receiver during the delivery.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import yaml

from tests.sshd import free_port, throwaway_sshd

MIB = 1024 * 1024
GOAL_WIRE_FIRST = 1.0
GOAL_WIRE_REPEAT = 0.6
GOAL_TIME = 1.5
GOAL_RSS_MB = 200.0
CASES = ("edits", "edits-again", "insert-front", "scattered", "new-data")


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss(threading.Thread):
    """Highest VmRSS of some pids while running."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {p: rss_kib(p) for p in pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            for p in self.pids:
                self.peak[p] = max(self.peak[p], rss_kib(p))

    def stop(self) -> dict[int, int]:
        self._halt.set()
        self.join(2)
        return self.peak


# -- test files ------------------------------------------------------------------------------

def _random_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(rng.randbytes(n))
            left -= n


def _overwrite_scattered(src: Path, dst: Path, fraction: float, piece: int, seed: int) -> None:
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    rng = random.Random(seed)
    with open(dst, "r+b") as f:
        for _ in range(max(1, round(size * fraction / piece))):
            f.seek(rng.randrange(0, size - piece))
            f.write(rng.randbytes(piece))


def _insert_front(src: Path, dst: Path, n: int, seed: int) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(random.Random(seed).randbytes(n))
        shutil.copyfileobj(fi, fo, 4 * MIB)


def _scattered_inserts_deletes(src: Path, dst: Path, count: int, seed: int) -> None:
    size = src.stat().st_size
    rng = random.Random(seed)
    points = sorted(rng.randrange(0, size - 64) for _ in range(count))
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        pos = 0
        for p in points:
            if p < pos:
                continue
            fo.write(fi.read(p - pos))
            pos = p
            n = rng.randint(1, 64)
            if rng.random() < 0.5:
                fo.write(rng.randbytes(n))      # insert
            else:
                fi.seek(pos + n)                # delete
                pos += n
        shutil.copyfileobj(fi, fo, 4 * MIB)


# -- processes -------------------------------------------------------------------------------

@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    config_path: Path
    log_path: Path
    state: Path
    spool: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(workdir: Path, config: dict[str, Any]) -> Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "relayd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "relayd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relayd.cli", "serve", "-c", str(config_path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=True)
    d = Daemon(proc, int(config["gateway"]["listen"][0].rsplit(":", 1)[1]), config_path, log_path,
               Path(config["node"]["state_dir"]), Path(config["node"]["spool_dir"]))
    deadline = time.monotonic() + 30
    while "relayd ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            d.stop()
            raise RuntimeError(f"relayd did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return d


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(str(path) + ".pub").read_text().strip()


@dataclass
class Env:
    work: Path
    sender: Daemon
    receiver: Daemon
    user_key: Path
    known_hosts: Path
    rsync_opts: str
    rsync_target: str
    rsync_root: Path
    journal: Any
    cipher: str

    def upload(self, local: Path, path: str) -> None:
        r = subprocess.run(["sftp", "-b", "-", "-c", self.cipher, "-P", str(self.sender.port), "-i", str(self.user_key),
                            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "bench@127.0.0.1"],
                           input=f"put {local} {path}\n", text=True, capture_output=True, timeout=3600)
        if r.returncode:
            raise RuntimeError(f"upload of {local} failed: {r.stderr}")

    def relay(self, local: Path, path: str) -> dict[str, Any]:
        """Upload into the sender and wait for the peer delivery; its figures."""
        before = {t.id for t in self.journal.list_transfers(tenant="bench")}
        self.upload(local, path)
        t = next(t for t in self.journal.list_transfers(tenant="bench") if t.id not in before and t.path == path)
        sampler = PeakRss([self.sender.proc.pid, self.receiver.proc.pid])
        sampler.start()
        try:
            deadline = time.monotonic() + 1800
            while True:
                ds = self.journal.deliveries_of(t.id)
                if ds and ds[0].state in ("delivered", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"delivery of {path} not finished")
                time.sleep(0.02)
        finally:
            peak = sampler.stop()
        d = ds[0]
        if d.state != "delivered":
            raise RuntimeError(f"delivery of {path} ended {d.state}: {d.last_error}")
        note = d.last_error or ""
        sig = int(m.group(1)) if (m := re.search(r"(\d+) signature bytes received", note)) else 0
        lit = int(m.group(1)) if (m := re.search(r"(\d+) literal bytes", note)) else d.bytes_sent
        return {"seconds": _epoch(d.updated_at) - _epoch(t.received_at), "sent": d.bytes_sent, "received": sig,
                "wire": d.bytes_sent + sig, "literal": lit, "note": note,
                "rss_sender_mb": peak[self.sender.proc.pid] / 1024,
                "rss_receiver_mb": peak[self.receiver.proc.pid] / 1024}

    def rsync(self, local: Path, name: str) -> dict[str, Any]:
        """rsync ``local`` over ssh onto ``rsync_root/name`` (which holds the basis); its figures."""
        t0 = time.perf_counter()
        r = subprocess.run(["rsync", "--ignore-times", "--no-whole-file", "--stats", "-e", self.rsync_opts, str(local),
                            f"{self.rsync_target}:{self.rsync_root / name}"],
                           capture_output=True, text=True, timeout=3600)
        secs = time.perf_counter() - t0
        if r.returncode:
            raise RuntimeError(f"rsync failed ({r.returncode}): {r.stderr}")

        def stat(label: str) -> int:
            m = re.search(rf"{label}: ([\d,]+)", r.stdout)
            return int(m.group(1).replace(",", "")) if m else 0
        sent, received = stat("Total bytes sent"), stat("Total bytes received")
        return {"seconds": secs, "sent": sent, "received": received, "wire": sent + received,
                "literal": stat("Literal data")}


@contextlib.contextmanager
def environment(args: argparse.Namespace, work: Path) -> Iterator[Env]:
    from relayd.integrity import KeyRing
    from relayd.integrity.keys import public_openssh
    from relayd.journal import Journal

    keys = work / "keys"
    keys.mkdir()
    user_pub = _keygen(keys / "user")
    peer_pub = _keygen(keys / "peer")
    ring = KeyRing.open(work / "S" / "state")  # the sender's manifest key, trusted by the receiver
    recv_port, send_port = free_port(), free_port()
    recv = {"node": {"id": "bench-r", "state_dir": str(work / "R" / "state"), "spool_dir": str(work / "R" / "spool")},
            "gateway": {"listen": [f"127.0.0.1:{recv_port}"]},
            "tenants": {"archive": {"quota": {"bytes": 64 * 1024 ** 3, "files": 100000}, "users": [
                {"name": "from-bench", "authorized_keys": [peer_pub], "permissions": ["peer"],
                 "trusted_signers": [public_openssh(ring.public)]}]}}}
    known_hosts = work / "known_hosts"
    with contextlib.ExitStack() as stack:
        receiver = _start(work / "R", recv)
        stack.callback(receiver.stop)
        host = (work / "R" / "state" / "ssh_host_ed25519_key.pub").read_text().split()
        send = {"node": {"id": "bench-s", "state_dir": str(work / "S" / "state"),
                         "spool_dir": str(work / "S" / "spool")},
                "gateway": {"listen": [f"127.0.0.1:{send_port}"]},
                "tenants": {"bench": {"quota": {"bytes": 64 * 1024 ** 3, "files": 100000}, "commit": "close",
                                      "users": [{"name": "bench", "authorized_keys": [user_pub],
                                                 "permissions": ["upload", "list", "overwrite", "mkdir"]}],
                                      "routes": [{"match": "**", "to": ["peer"]}]}},
                "destinations": {"peer": {"type": "relayd", "host": "127.0.0.1", "port": recv_port,
                                          "user": "from-bench", "identity": str(keys / "peer"),
                                          "known_hosts": str(known_hosts), "path": "/{tenant}"}}}
        lines = [f"[127.0.0.1]:{recv_port} {host[0]} {host[1]}"]
        known_hosts.write_text("\n".join(lines) + "\n")
        sender = _start(work / "S", send)
        stack.callback(sender.stop)
        sh = (work / "S" / "state" / "ssh_host_ed25519_key.pub").read_text().split()
        lines.append(f"[127.0.0.1]:{send_port} {sh[0]} {sh[1]}")
        known_hosts.write_text("\n".join(lines) + "\n")
        sshd = stack.enter_context(throwaway_sshd(work / "sshd", authorized_keys=[user_pub]))
        kh_rsync = work / "known_hosts_rsync"
        kh_rsync.write_text(sshd.known_hosts_line() + "\n")
        rsync_opts = (f"ssh -p {sshd.port} -i {keys / 'user'} -o IdentitiesOnly=yes -o BatchMode=yes "
                      f"-o UserKnownHostsFile={kh_rsync} -o StrictHostKeyChecking=yes -c {args.cipher}")
        journal = Journal.open(Path(send["node"]["state_dir"]) / "journal.db", readonly=True)
        stack.callback(journal.close)
        rsync_root = work / "rsync-dest"
        rsync_root.mkdir()
        yield Env(work, sender, receiver, keys / "user", known_hosts, rsync_opts, f"{sshd.user}@127.0.0.1",
                  rsync_root, journal, args.cipher)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case; the results as a dict."""
    from relayd.config import parse_size

    size = parse_size(args.size)
    new_size = parse_size(args.new_size)
    only = [c for c in (args.only.split(",") if args.only else CASES)]
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-delta-", dir=args.workdir))
    results: dict[str, Any] = {"size": size, "new_size": new_size, "cipher": args.cipher, "cases": {}}
    try:
        files = work / "files"
        files.mkdir()
        log(f"making test files in {files}")
        basis = files / "basis.bin"
        _random_file(basis, size, 1)
        with environment(args, work) as env:
            received_root = env.receiver.spool / "archive" / "inbox" / "bench"

            def seed(name: str, src: Path) -> None:
                """Both receivers get the basis (relayd: a whole first delivery)."""
                env.relay(src, f"/{name}")
                shutil.copyfile(src, env.rsync_root / name)

            def measure(case: str, name: str, src: Path) -> None:
                ours = env.relay(src, f"/{name}")
                theirs = env.rsync(src, name)
                for where in (received_root / name, env.rsync_root / name):
                    if _sha256(where) != _sha256(src):
                        raise RuntimeError(f"{where} differs from {src}")
                results["cases"][case] = {"relayd": ours, "rsync": theirs}
                log(f"{case}: relayd {ours['wire']:,} B {ours['seconds']:.2f}s | rsync {theirs['wire']:,} B "
                    f"{theirs['seconds']:.2f}s")

            if "edits" in only or "edits-again" in only:
                seed("edits.bin", basis)
                e1 = files / "edits1.bin"
                _overwrite_scattered(basis, e1, 0.01, 4096, 2)
                measure("edits", "edits.bin", e1)
                if "edits-again" in only:
                    e2 = files / "edits2.bin"
                    _overwrite_scattered(e1, e2, 0.01, 4096, 3)
                    measure("edits-again", "edits.bin", e2)
            if "insert-front" in only:
                seed("front.bin", basis)
                f1 = files / "front.bin"
                _insert_front(basis, f1, 1000, 4)
                measure("insert-front", "front.bin", f1)
            if "scattered" in only:
                seed("scattered.bin", basis)
                s1 = files / "scattered.bin"
                _scattered_inserts_deletes(basis, s1, 256, 5)
                measure("scattered", "scattered.bin", s1)
            if "new-data" in only:
                old = files / "old.bin"
                _random_file(old, new_size, 6)
                seed("new.bin", old)
                n1 = files / "new.bin"
                _random_file(n1, new_size, 7)
                measure("new-data", "new.bin", n1)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and goals per case."""
    out = {}
    for case, r in results["cases"].items():
        ours, theirs = r["relayd"], r["rsync"]
        wire = ours["wire"] / max(1, theirs["wire"])
        secs = ours["seconds"] / max(1e-9, theirs["seconds"])
        goals = {"time": secs < 1.0 if case == "new-data" else secs <= GOAL_TIME,
                 "rss": max(ours["rss_sender_mb"], ours["rss_receiver_mb"]) < GOAL_RSS_MB}
        if case != "new-data":
            goals["wire"] = wire <= (GOAL_WIRE_REPEAT if case == "edits-again" else GOAL_WIRE_FIRST)
        out[case] = {"wire_ratio": round(wire, 3), "time_ratio": round(secs, 3), "goals": goals}
    return out


def print_table(results: dict[str, Any], ev: dict[str, Any]) -> None:
    """Human-readable table."""
    print(f"relayd delta benchmark: {results['size'] / MIB:.0f} MiB files ({results['new_size'] / MIB:.0f} MiB for "
          f"new-data), cipher {results['cipher']}; wire = bytes both directions; relayd seconds = commit -> delivered "
          f"(journal), rsync seconds = wall time of rsync over ssh")
    hdr = (f"{'case':13} {'relayd wire':>13} {'rsync wire':>13} {'ratio':>6}  {'relayd s':>8} {'rsync s':>8} "
           f"{'ratio':>6}  {'RSS S/R MB':>11}  goals")
    print(hdr)
    print("-" * len(hdr))
    for case, r in results["cases"].items():
        o, t, e = r["relayd"], r["rsync"], ev[case]
        goals = " ".join(f"{k}:{'met' if v else 'NOT MET'}" for k, v in e["goals"].items())
        print(f"{case:13} {o['wire']:>13,} {t['wire']:>13,} {e['wire_ratio']:>6.3f}  {o['seconds']:>8.2f} "
              f"{t['seconds']:>8.2f} {e['time_ratio']:>6.2f}  {o['rss_sender_mb']:>5.0f}/{o['rss_receiver_mb']:<5.0f}"
              f"  {goals}")
    print("-" * len(hdr))
    print(f"goals: wire <= {GOAL_WIRE_FIRST}x rsync (first sync), <= {GOAL_WIRE_REPEAT}x (edits-again, repeated "
          f"sync); time <= {GOAL_TIME}x rsync, < 1x on new-data; sender and receiver RSS < {GOAL_RSS_MB:.0f} MB")


def cmd_delta(args: argparse.Namespace) -> int:
    """relayd peer delta sync vs. rsync over SSH (see scripts/bench_delta.py)."""
    for tool in ("rsync", "sftp", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (scripts/test installs it)")
    results = run(args)
    ev = evaluate(results)
    if args.json:
        print(json.dumps({**results, "evaluation": ev}, indent=2))
    else:
        print_table(results, ev)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``delta`` on the bench's subparsers."""
    sp = sub.add_parser("delta", help="relayd peer delta sync vs. rsync over SSH",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(fn=cmd_delta)
    sp.add_argument("--size", default="256MiB", help="basis size (default 256MiB)")
    sp.add_argument("--new-size", default="64MiB", help="new-data case size (default 64MiB)")
    sp.add_argument("--only", metavar="LIST", help=f"comma-separated cases (default all: {','.join(CASES)})")
    sp.add_argument("--cipher", default="aes128-gcm@openssh.com", help="rsync's ssh -c cipher")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--workdir", type=Path, help="parent of the temporary folder")
    sp.add_argument("--keep", action="store_true", help="keep the temporary folder")

