"""Client-side checksum checks against a real daemon: SFTP check-file (paramiko), exec
``sha256sum``/``sha1sum``/``md5sum`` (OpenSSH ``ssh``, rclone), and the chroot/permission rules
they share with downloads.

One daemon serves the module. Its acme inbox also holds things an administrator (not a client)
could have put there: symlinks to files and directories outside the root, and a decoy
``etc/passwd`` inside the root.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import paramiko
import pytest
from paramiko.sftp import CMD_EXTENDED, int64

from tests.conftest import two_tenants
from tests.helpers import (Daemon, Key, base_config, free_port, make_file, paramiko_session, run_daemon, ssh,
                           ssh_opts, wait_for)

MiB = 1024 * 1024
ALGS = ("sha256", "sha1", "md5")


def digests(data: bytes) -> dict[str, str]:
    """Hex digests of ``data`` for every supported algorithm."""
    return {alg: hashlib.new(alg, data).hexdigest() for alg in ALGS}


@dataclass
class World:
    """The module's daemon, keys and reference data."""

    daemon: Daemon
    keys: dict[str, Key]
    files: dict[str, bytes]        # virtual path in acme's view -> content
    secrets: set[str]              # hex digests of files outside acme's root (must never be printed)
    src_dir: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> Iterator[World]:
    """A daemon with files uploaded by acme and globex, plus planted symlinks and a decoy."""
    workdir = tmp_path_factory.mktemp("checksums-gw")
    port = free_port()
    src_dir = workdir / "src"
    src_dir.mkdir()
    sources = {
        "/small.txt": b"hello relayd\n",
        "/empty.bin": b"",
        "/big.bin": make_file(src_dir / "big.bin", 20 * MiB + 123, seed=3).read_bytes(),
        "/dir/with space & 'quotes'.bin": b"spaces and quotes\n" * 1000,
        "/back\\slash.bin": b"backslash\n",
        "/-dash.bin": b"dash\n",
    }
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"top secret outside the root\n")
    secrets = set(digests(b"top secret outside the root\n").values())
    secrets |= set(digests(Path("/etc/passwd").read_bytes()).values())
    with run_daemon(workdir, base_config(workdir, port, two_tenants(keys))) as d:
        with paramiko_session(d, "acme-erp", keys["acme"]) as sftp:
            sftp.mkdir("/dir")
            for vpath, data in sources.items():
                with sftp.open(vpath, "wb") as f:
                    f.write(data)
        globex_data = b"globex private data\n"
        with paramiko_session(d, "globex-1", keys["globex"]) as sftp:
            with sftp.open("/globex-only.bin", "wb") as f:
                f.write(globex_data)
        secrets |= set(digests(globex_data).values())
        inbox = d.inbox("acme")
        os.symlink(outside / "secret.txt", inbox / "link-out.txt")
        os.symlink(outside, inbox / "linkdir")
        os.symlink("/etc/passwd", inbox / "passwd-link")
        os.symlink(d.inbox("globex") / "globex-only.bin", inbox / "globex-link.bin")
        (inbox / "etc").mkdir()
        (inbox / "etc" / "passwd").write_bytes(b"decoy inside the root\n")
        files = dict(sources)
        files["/etc/passwd"] = b"decoy inside the root\n"
        yield World(daemon=d, keys=keys, files=files, secrets=secrets, src_dir=src_dir)


def run_sum(w: World, *command: str, user: str = "acme-erp", key: str = "acme") -> subprocess.CompletedProcess[str]:
    """``ssh user@gw <command>`` with OpenSSH's client (words joined by ssh with spaces)."""
    return ssh(w.daemon, w.keys[key], user, "-T", "--", *command, timeout=60)


def assert_no_secret(w: World, *texts: str) -> None:
    """No digest of a file outside the user's view appears in any client-visible text."""
    for text in texts:
        for secret in w.secrets:
            assert secret not in text, f"an outside file's digest leaked: {text!r}"
        assert str(w.daemon.spool) not in text and str(w.daemon.workdir) not in text, text


def check_file_name(sftp: paramiko.SFTPClient, path: str, algs: str = "sha256", start: int = 0, length: int = 0,
                    block: int = 0) -> tuple[str, bytes]:
    """A raw ``check-file-name`` request (paramiko has no API for it)."""
    _, msg = sftp._request(CMD_EXTENDED, "check-file-name", path, algs, int64(start), int64(length),  # noqa: SLF001
                           block)
    assert msg.get_text() == "check-file"
    return msg.get_text(), msg.get_remainder()


# -- SFTP check-file ------------------------------------------------------------------------------


@pytest.mark.parametrize("vpath", ["/small.txt", "/empty.bin", "/big.bin", "/dir/with space & 'quotes'.bin"])
def test_paramiko_check_handle(world: World, vpath: str) -> None:
    """paramiko ``SFTPFile.check()`` (check-file on a read handle) returns each algorithm's digest."""
    expected = digests(world.files[vpath])
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
        with sftp.open(vpath, "rb") as f:
            for alg in ALGS:
                assert f.check(alg).hex() == expected[alg], alg
            # preference order: the first supported algorithm wins
            assert f.check("sha512,crc32,md5,sha256").hex() == expected["md5"]


def test_paramiko_check_ranges_and_blocks(world: World) -> None:
    """Offset/length select a range; block_size > 0 gives one digest per block."""
    data = world.files["/big.bin"]
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
        with sftp.open("/big.bin", "rb") as f:
            assert f.check("sha256", 1000, 5000).hex() == hashlib.sha256(data[1000:6000]).hexdigest()
            assert f.check("sha1", 20 * MiB).hex() == hashlib.sha1(data[20 * MiB:]).hexdigest()
            assert f.check("sha1", len(data) + 10).hex() == hashlib.sha1(b"").hexdigest()
            block = 1 << 20
            blocks = f.check("md5", 0, 4 * block + 7, block)
            assert blocks == b"".join(hashlib.md5(data[i:min(i + block, 4 * block + 7)]).digest()
                                      for i in range(0, 4 * block + 7, block))
            with pytest.raises(IOError):
                f.check("sha256", 0, 0, 256)  # 80k+ digests: too many for one reply
            with pytest.raises(IOError):
                f.check("sha512")  # no supported algorithm
            assert f.read(5) == data[:5]  # the handle still works


def test_check_file_name(world: World) -> None:
    """``check-file-name`` hashes a path in the user's view."""
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
        alg, raw = check_file_name(sftp, "/dir/with space & 'quotes'.bin", "crc32,sha1")
        assert alg == "sha1"
        assert raw.hex() == digests(world.files["/dir/with space & 'quotes'.bin"])["sha1"]
        alg, raw = check_file_name(sftp, "../../etc/passwd")
        assert raw.hex() == digests(world.files["/etc/passwd"])["sha256"]  # the decoy inside the root


def test_check_handle_open_for_writing_refused(world: World) -> None:
    """An upload in progress has no digest to give; the upload still commits afterwards."""
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
        with sftp.open("/writing.bin", "wb") as f:
            f.write(b"abc")
            with pytest.raises(IOError):
                f.check("sha256")
        with sftp.open("/writing.bin", "rb") as f:
            assert f.check("sha256").hex() == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("path", ["/link-out.txt", "/linkdir/secret.txt", "/passwd-link", "/globex-link.bin",
                                  "/globex-only.bin", "/../globex/inbox/globex-only.bin", "/nope", "/dir"])
def test_check_file_name_stays_inside(world: World, path: str) -> None:
    """Symlinks, escapes and other tenants' files give an error, never a digest."""
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
        with pytest.raises(IOError) as err:
            check_file_name(sftp, path)
        assert_no_secret(world, str(err.value))


def test_check_file_needs_download_permission(world: World) -> None:
    """acme-drop (upload, list, mkdir) may not read digests either."""
    with paramiko_session(world.daemon, "acme-drop", world.keys["acme2"]) as sftp:
        with pytest.raises(PermissionError):
            check_file_name(sftp, "/small.txt")


# -- exec sha256sum / sha1sum / md5sum ------------------------------------------------------------


@pytest.mark.parametrize("program, alg", [("sha256sum", "sha256"), ("sha1sum", "sha1"), ("md5sum", "md5")])
def test_ssh_sum(world: World, program: str, alg: str) -> None:
    """``ssh gw sha256sum /path`` prints coreutils' line and exits 0."""
    r = run_sum(world, program, "/big.bin")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{digests(world.files['/big.bin'])[alg]}  /big.bin\n"
    assert r.stderr == ""


@pytest.mark.parametrize("arg, printed, vpath", [
    ("small.txt", "small.txt", "/small.txt"),
    ("-- /small.txt", "/small.txt", "/small.txt"),
    ("-- -dash.bin", "-dash.bin", "/-dash.bin"),
    ("\"/dir/with space & 'quotes'.bin\"", "/dir/with space & 'quotes'.bin", "/dir/with space & 'quotes'.bin"),
    ("/dir/with\\ space\\ \\&\\ \\'quotes\\'.bin", "/dir/with space & 'quotes'.bin", "/dir/with space & 'quotes'.bin"),
    ("'/back\\slash.bin'", "/back\\\\slash.bin", "/back\\slash.bin"),
    ("/empty.bin", "/empty.bin", "/empty.bin"),
    ("../../etc/passwd", "../../etc/passwd", "/etc/passwd"),
    ("/etc/passwd", "/etc/passwd", "/etc/passwd"),
])
def test_ssh_sum_paths(world: World, arg: str, printed: str, vpath: str) -> None:
    """Quoting, ``--``, coreutils' backslash escaping; ``..`` stops at the root (the decoy answers)."""
    r = run_sum(world, "sha256sum", arg)
    assert r.returncode == 0, r.stderr
    prefix = "\\" if "\\" in vpath else ""
    assert r.stdout == f"{prefix}{digests(world.files[vpath])['sha256']}  {printed}\n"
    assert_no_secret(world, r.stdout, r.stderr)


@pytest.mark.parametrize("arg, message", [
    ("/nope.bin", "sha256sum: /nope.bin: No such file or directory"),
    ("'/no such.bin'", "sha256sum: '/no such.bin': No such file or directory"),
    ("/dir", "sha256sum: /dir: Is a directory"),
    ("/link-out.txt", "sha256sum: /link-out.txt: Permission denied"),
    ("/linkdir/secret.txt", "sha256sum: /linkdir/secret.txt: Permission denied"),
    ("/passwd-link", "sha256sum: /passwd-link: Permission denied"),
    ("/globex-link.bin", "sha256sum: /globex-link.bin: Permission denied"),
    ("/globex-only.bin", "sha256sum: /globex-only.bin: No such file or directory"),
    ("../globex/inbox/globex-only.bin", "sha256sum: ../globex/inbox/globex-only.bin: No such file or directory"),
    ("../../../../../../etc/shadow", "sha256sum: ../../../../../../etc/shadow: No such file or directory"),
])
def test_ssh_sum_errors(world: World, arg: str, message: str) -> None:
    """Missing, forbidden and outside files: coreutils' message on stderr, exit 1, nothing leaked."""
    r = run_sum(world, "sha256sum", arg)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr == message + "\n"
    assert_no_secret(world, r.stdout, r.stderr)


def test_ssh_sum_needs_download_permission(world: World) -> None:
    """A user without ``download`` gets Permission denied."""
    r = run_sum(world, "md5sum", "/small.txt", user="acme-drop", key="acme2")
    assert r.returncode == 1
    assert r.stderr == "md5sum: /small.txt: Permission denied\n"


def test_other_tenant_sees_only_its_own(world: World) -> None:
    """globex-1 hashes its own file; acme's file does not exist for it."""
    r = run_sum(world, "sha1sum", "/globex-only.bin", user="globex-1", key="globex")
    assert r.returncode == 0
    assert r.stdout == f"{hashlib.sha1(b'globex private data' + bytes([10])).hexdigest()}  /globex-only.bin\n"
    r = run_sum(world, "sha1sum", "/small.txt", user="globex-1", key="globex")
    assert (r.returncode, r.stdout) == (1, "")


@pytest.mark.parametrize("command", [
    ["sha256sum", "/small.txt", "/big.bin"], ["sha256sum", "-c", "/small.txt"], ["sha256sum", "--check", "x"],
    ["sha256sum"], ["sha256sum", "-"], ["cat", "/small.txt"], ["sha256sum", "/small.txt;", "id"],
    ["sha256sum", "/small.txt", "&&", "id"], ["sha256sum", "$(id)"], ["sha256sum", "`id`"], ["sha256sum", "*.txt"],
    ["sha256sum", "/small.txt", "|", "cat"], ["/usr/bin/sha256sum", "/small.txt"], ["sh", "-c", "id"],
    ["sha512sum", "/small.txt"], ["md5sum", "/small.txt", ">", "/out"],
])
def test_refused_commands(world: World, command: list[str]) -> None:
    """Anything but ``<sum> [--] <path>`` is refused at the exec request and logged."""
    r = run_sum(world, *command)
    assert r.returncode == 255, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    joined = " ".join(command)  # what ssh sends
    assert any("refused: exec request" in line and repr(joined) in line
               for line in world.daemon.log().splitlines()), joined


def test_daemon_keeps_serving(world: World) -> None:
    """After refusals, errors and big hashes, an open SFTP session and new logins still work."""
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
        for command in (["sha256sum", "x;", "id"], ["sha256sum", "/big.bin"], ["sha256sum", "/link-out.txt"]):
            run_sum(world, *command)
        assert sftp.stat("/small.txt").st_size == len(world.files["/small.txt"])
        with sftp.open("/after.bin", "wb") as f:
            f.write(b"after")
    r = run_sum(world, "md5sum", "/after.bin")
    assert r.stdout == f"{hashlib.md5(b'after').hexdigest()}  /after.bin\n"
    log = world.daemon.log()
    assert "exec md5sum conn=" in log and "Traceback" not in log


def cpu_seconds(d: Daemon) -> float:
    """User + system CPU time the daemon process used so far."""
    fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_big_hash_runs_beside_the_loop_and_stops_with_the_client(world: World) -> None:
    """Hashing a large file leaves other sessions responsive; a client that hangs up mid-hash
    cancels it cleanly."""
    big = world.daemon.inbox("acme") / "sparse-8g.bin"
    with open(big, "wb") as f:
        f.truncate(8 << 30)  # sparse: costs no disk, still takes seconds to hash
    try:
        proc = subprocess.Popen(["ssh", *ssh_opts(world.daemon, world.keys["acme"], port_flag="-p"), "-T",
                                 "acme-erp@127.0.0.1", "sha256sum /sparse-8g.bin"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: "command='sha256sum /sparse-8g.bin'" in world.daemon.log(), 20, what="exec started")
            with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as sftp:
                t0 = time.monotonic()
                for _ in range(5):
                    sftp.stat("/small.txt")
                assert time.monotonic() - t0 < 1.0
            assert proc.poll() is None, "the 8 GiB hash finished too fast to test anything"
        finally:
            proc.kill()
            proc.wait()
        time.sleep(0.3)  # the piece in flight (<= 8 MiB) ends, then the hash stops
        before = cpu_seconds(world.daemon)
        time.sleep(1.0)
        assert cpu_seconds(world.daemon) - before < 0.5, "the daemon kept hashing for a client that left"
        r = run_sum(world, "md5sum", "/small.txt")
        assert r.returncode == 0, r.stderr
        log = world.daemon.log()
        lines = [line for line in log.splitlines() if "path=/sparse-8g.bin" in line]
        assert lines and all("abandoned (client gone)" in line for line in lines), lines
        assert "Traceback" not in log
    finally:
        big.unlink()


# -- rclone ---------------------------------------------------------------------------------------


def rclone(w: World, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """rclone 1.60 with an on-the-fly sftp remote that reads hashes with md5sum/sha1sum over exec."""
    conf = tmp_path / "rclone.conf"
    conf.write_text("")
    return subprocess.run(["rclone", "--config", str(conf), "--retries", "1", "--low-level-retries", "1", *args],
                          capture_output=True, text=True, timeout=120)


def remote(w: World) -> str:
    return (f":sftp,host=127.0.0.1,port={w.daemon.port},user=acme-erp,key_file={w.keys['acme'].path},"
            "shell_type=unix,md5sum_command=md5sum,sha1sum_command=sha1sum:")


def test_rclone_hashsum(world: World, tmp_path: Path) -> None:
    """``rclone hashsum MD5/SHA-1`` reads digests through exec md5sum/sha1sum (names escaped by rclone)."""
    for name, alg in (("MD5", "md5"), ("SHA-1", "sha1")):
        r = rclone(world, tmp_path, "hashsum", name, remote(world) + "dir")
        assert r.returncode == 0, r.stderr
        vpath = "/dir/with space & 'quotes'.bin"
        assert r.stdout == f"{digests(world.files[vpath])[alg]}  with space & 'quotes'.bin\n"
    r = rclone(world, tmp_path, "lsjson", "--hash", "--files-only", remote(world) + "big.bin")
    assert r.returncode == 0, r.stderr
    [entry] = json.loads(r.stdout)
    expected = digests(world.files["/big.bin"])
    assert entry["Hashes"] == {"md5": expected["md5"], "sha1": expected["sha1"]}


def test_rclone_copy_and_check(world: World, tmp_path: Path) -> None:
    """rclone verifies its uploads by hash and ``rclone check`` matches a local tree."""
    local = tmp_path / "tree"
    local.mkdir()
    make_file(local / "one.bin", 3 * MiB + 1, seed=11)
    (local / "two (2) $x.txt").write_bytes(b"two\n")
    r = rclone(world, tmp_path, "copy", "-v", str(local), remote(world) + "rc")
    assert r.returncode == 0, r.stderr
    assert "corrupted" not in r.stderr
    r = rclone(world, tmp_path, "check", str(local), remote(world) + "rc")
    assert r.returncode == 0, r.stderr
    assert "0 differences found" in r.stderr
    assert "2 matching files" in r.stderr
    assert "exec md5sum conn=" in world.daemon.log()
    # a changed file on the far side is noticed by hash
    (local / "two (2) $x.txt").write_bytes(b"TWO\n")
    r = rclone(world, tmp_path, "check", str(local), remote(world) + "rc")
    assert r.returncode != 0
    assert "1 differences found" in r.stderr
