"""``scripts/bench dropfolder``: files per second from a drop folder to committed, next to ``cp``.

One ``relayd serve`` on 127.0.0.1 with one tenant and one drop folder (``after: delete`` by
default, pattern ``**``). Per run:

* **anchor**: ``cp -r`` of the N files (random content, made once) into an empty folder on the
  same file system — the plain copy the legacy system itself would do, no fsync (an untimed
  ``sync`` before each measured copy keeps earlier write-back out of both figures);
* **relayd**: the same ``cp -r`` into the drop folder; the clock runs from the start of ``cp``
  until the last of the N files is committed (visible in the tenant's inbox, which happens only
  after its journal commit). Afterwards the journal must hold exactly N transfers with source
  ``dropfolder:<folder>``, one per file, and the drop folder must be empty (the originals are
  removed only after their commit).

Reported: both rates in files per second, the ratio relayd/cp, and relayd's CPU seconds and peak
RSS during the run. Everything lives in a temporary folder removed at the end (``--keep`` keeps
it, with relayd's log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from bench_delta import rss_kib  # scripts/bench_delta.py
from tests.sshd import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    """Progress on stderr (stdout stays clean for ``--json``)."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _make_files(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        with open(folder / f"f{i:06d}.dat", "wb") as f:
            f.write(os.urandom(size))


def _count(folder: Path) -> int:
    n = 0
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                n += 1
    return n


def _cp(src: Path, dest: Path) -> float:
    """``cp -r src/. dest``; its wall time (after an untimed ``sync``, so that neither side pays
    for the other's write-back)."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", f"{src}/.", str(dest)], check=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _relayd(work: Path, drop: Path, after: str, settle: str) -> Iterator[subprocess.Popen[bytes]]:
    port = free_port()
    config = {"node": {"id": "bench-drop", "state_dir": str(work / "state"), "spool_dir": str(work / "spool")},
              "gateway": {"listen": [f"127.0.0.1:{port}"]},
              "tenants": {"bench": {}},
              "dropfolders": [{"path": str(drop), "tenant": "bench", "after": after, "settle": settle}]}
    cfg = work / "relayd.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = work / "relayd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relayd.cli", "serve", "-c", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "relayd ready" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relayd did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while "dropfolder=" not in log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("relayd does not watch the drop folder")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the files, measure cp and relayd ``args.runs`` times; the figures."""
    from relayd.config import parse_size
    from relayd.journal import Journal

    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-drop-", dir=args.workdir))
    result: dict[str, Any] = {"files": args.files, "size": size, "after": args.after, "runs": []}
    try:
        src = work / "src"
        log(f"making {args.files} files of {size} bytes in {src}")
        _make_files(src, args.files, size)
        drop = work / "drop"
        drop.mkdir()
        with _relayd(work, drop, args.after, args.settle) as proc:
            inbox = work / "spool" / "bench" / "inbox"
            for i in range(args.runs):
                anchor = work / f"cp-{i}"
                anchor.mkdir()
                cp_secs = _cp(src, anchor)
                shutil.rmtree(anchor)
                before = _count(inbox)
                cpu0, peak = _cpu_seconds(proc.pid), [rss_kib(proc.pid)]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.1):
                        peak.append(rss_kib(proc.pid))
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                os.sync()
                t0 = time.perf_counter()
                drop_cp = _cp(src, drop)
                deadline = time.monotonic() + args.timeout
                while _count(inbox) - before < args.files:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"only {_count(inbox) - before} of {args.files} files committed")
                    time.sleep(0.02)
                secs = time.perf_counter() - t0
                stop.set()
                sampler.join()
                cpu = _cpu_seconds(proc.pid) - cpu0
                run_ = {"cp_seconds": cp_secs, "cp_files_per_s": args.files / cp_secs, "relayd_seconds": secs,
                        "relayd_files_per_s": args.files / secs, "ratio": cp_secs / secs,
                        "drop_cp_seconds": drop_cp, "relayd_cpu_seconds": cpu, "relayd_peak_rss_mb": max(peak) / 1024}
                result["runs"].append(run_)
                log(f"run {i + 1}: cp {run_['cp_files_per_s']:,.0f} files/s | relayd {run_['relayd_files_per_s']:,.0f}"
                    f" files/s ({secs:.2f}s, {cpu:.1f} CPU s) | ratio {run_['ratio']:.3f}")
                if args.after == "delete":
                    deadline = time.monotonic() + 30
                    while any(os.scandir(drop)):
                        if time.monotonic() > deadline:
                            raise RuntimeError("originals left in the drop folder after their commit")
                        time.sleep(0.05)
                    shutil.rmtree(inbox)  # the next run lands on fresh names
                    inbox.mkdir()
                else:
                    break  # keep/move: one run (the folder is not empty again)
        journal = Journal.open(work / "state" / "journal.db", readonly=True)
        try:
            rows = journal.list_transfers(tenant="bench")
        finally:
            journal.close()
        taken = [t for t in rows if t.source == f"dropfolder:{os.path.realpath(drop)}"]
        expected = args.files * len(result["runs"])
        if len(taken) != expected or len({t.path for t in taken}) != args.files:
            raise RuntimeError(f"journal holds {len(taken)} drop-folder transfers, expected {expected} "
                               f"({args.files} distinct paths)")
        result["verified"] = f"{len(taken)} transfers, one per file and run"
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def print_table(res: dict[str, Any]) -> None:
    """Human-readable result."""
    print(f"relayd drop-folder benchmark: {res['files']:,} files of {res['size']:,} bytes, after: {res['after']}; "
          f"relayd = from the start of cp into the drop folder until the last file is committed")
    hdr = f"{'run':>3}  {'cp files/s':>11}  {'relayd files/s':>14}  {'ratio':>6}  {'relayd s':>8}  {'CPU s':>6}  {'RSS MB':>6}"
    print(hdr)
    print("-" * len(hdr))
    for i, r in enumerate(res["runs"], 1):
        print(f"{i:>3}  {r['cp_files_per_s']:>11,.0f}  {r['relayd_files_per_s']:>14,.0f}  {r['ratio']:>6.3f}  "
              f"{r['relayd_seconds']:>8.2f}  {r['relayd_cpu_seconds']:>6.1f}  {r['relayd_peak_rss_mb']:>6.0f}")
    print("-" * len(hdr))
    print(f"verified: {res['verified']}")


def cmd_dropfolder(args: argparse.Namespace) -> int:
    """Drop-folder ingestion rate vs. a plain cp of the same files (see scripts/bench_dropfolder.py)."""
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``dropfolder`` on the bench's subparsers."""
    sp = sub.add_parser("dropfolder", help="drop-folder ingestion rate vs. cp of the same files",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(fn=cmd_dropfolder)
    sp.add_argument("--files", type=int, default=10000, help="number of files (default 10000)")
    sp.add_argument("--size", default="4KiB", help="size of each file (default 4KiB)")
    sp.add_argument("--runs", type=int, default=2, help="measured runs (after: delete only; default 2)")
    sp.add_argument("--after", default="delete", help="delete | keep | move:DIR (default delete)")
    sp.add_argument("--settle", default="5s", help="dropfolders[].settle (default 5s)")
    sp.add_argument("--timeout", type=float, default=600, help="give up after this many seconds per run")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--workdir", type=Path, help="parent of the temporary folder")
    sp.add_argument("--keep", action="store_true", help="keep the temporary folder (config, relayd.log)")
