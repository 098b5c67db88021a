"""Client compatibility: every common SFTP client uploads, and the journal holds the right digest.

One daemon serves the whole module; each test uploads under its own name and checks only the
journal rows for that name, so the tests stay independent of each other's order.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import two_tenants
from tests.helpers import (Daemon, Key, base_config, free_port, make_file, paramiko_client, run_daemon,
                           sha256_file, ssh_opts)

MiB = 1024 * 1024
SIZES = [0, 1, 10 * MiB, pytest.param(200 * MiB, marks=pytest.mark.slow)]
CLIENT_TIMEOUT = 120


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> Iterator[Daemon]:
    """One relayd with the two standard tenants for all client tests of this module."""
    workdir = tmp_path_factory.mktemp("clients-gw")
    port = free_port()
    with run_daemon(workdir, base_config(workdir, port, two_tenants(keys))) as d:
        yield d


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Source files by size, made once (the 200 MiB one is shared by both clients)."""
    d = tmp_path_factory.mktemp("client-src")
    return {size: make_file(d / f"src-{size}.bin", size, seed=size + 7) for size in (0, 1, 10 * MiB, 200 * MiB)}


def assert_committed(d: Daemon, vpath: str, src: Path, user: str = "acme-erp", tenant: str = "acme") -> dict[str, Any]:
    """Exactly one transfer for ``vpath`` with the source's size and SHA-256; inbox holds the same bytes."""
    digest = sha256_file(src)
    rows = [t for t in d.transfers("--tenant", tenant) if t["path"] == vpath]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["state"] == "committed"
    assert row["user"] == user
    assert row["size"] == src.stat().st_size
    assert row["sha256"] == digest
    published = d.inbox(tenant).joinpath(vpath.lstrip("/"))
    assert published.is_file()
    assert sha256_file(published) == digest
    assert sha256_file(d.spool / tenant / "objects" / row["object"]) == digest
    return row


def run(args: list[str], timeout: float = CLIENT_TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a client command, capturing text output."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


# -- OpenSSH sftp and paramiko, all sizes ---------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_openssh_sftp_upload(gw: Daemon, keys: dict[str, Key], files: dict[int, Path], size: int) -> None:
    """OpenSSH ``sftp -b`` uploads commit with the source digest."""
    vpath = f"/openssh-{size}.bin"
    r = gw.sftp(keys["acme"], "acme-erp", f"put {files[size]} {vpath}\n")
    assert r.returncode == 0, r.stderr
    assert_committed(gw, vpath, files[size])


@pytest.mark.parametrize("size", SIZES)
def test_paramiko_upload(gw: Daemon, keys: dict[str, Key], files: dict[int, Path], size: int) -> None:
    """paramiko ``put`` (with its stat-after-put size check) commits with the source digest."""
    vpath = f"/paramiko-{size}.bin"
    sftp = paramiko_client(gw, "acme-erp", keys["acme"])
    try:
        attrs = sftp.put(str(files[size]), vpath, confirm=True)
        assert attrs.st_size == size
    finally:
        sftp.get_channel().get_transport().close()
    assert_committed(gw, vpath, files[size])


# -- scp, asyncssh, rclone, lftp, curl ------------------------------------------------------------


def test_openssh_scp_upload(gw: Daemon, keys: dict[str, Key], files: dict[int, Path]) -> None:
    """OpenSSH 9.2 ``scp`` (SFTP mode by default) exits 0 and commits."""
    vpath = "/scp-10m.bin"
    r = run(["scp", "-q", *ssh_opts(gw, keys["acme"]), str(files[10 * MiB]), f"acme-erp@127.0.0.1:{vpath}"])
    assert r.returncode == 0, f"scp exit {r.returncode}: {r.stderr}"
    assert_committed(gw, vpath, files[10 * MiB])


def test_asyncssh_client_upload(gw: Daemon, keys: dict[str, Key], files: dict[int, Path]) -> None:
    """asyncssh's own SFTP client ``put`` commits."""
    import asyncssh

    vpath = "/asyncssh-10m.bin"

    async def upload() -> None:
        async with asyncssh.connect("127.0.0.1", gw.port, username="acme-erp", known_hosts=None,
                                    client_keys=[str(keys["acme"].path)], agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(files[10 * MiB]), vpath)

    asyncio.run(asyncio.wait_for(upload(), CLIENT_TIMEOUT))
    assert_committed(gw, vpath, files[10 * MiB])


def test_rclone_copyto(gw: Daemon, keys: dict[str, Key], files: dict[int, Path], tmp_path: Path) -> None:
    """rclone 1.60 (pads its last WRITE packet) uploads with default set-modtime and exits 0.

    ``shell_type=none`` stops rclone from trying remote shell commands (md5sum/sha1sum over exec),
    which relayd refuses; with no shell there is no remote hash to check, so
    ``--sftp-disable-hashcheck`` is not needed.
    """
    vpath = "/rclone-10m.bin"
    conf = tmp_path / "rclone.conf"
    conf.write_text("")  # keep rclone away from the user's own config
    remote = (f":sftp,host=127.0.0.1,port={gw.port},user=acme-erp,key_file={keys['acme'].path},"
              "shell_type=none:")
    r = run(["rclone", "--config", str(conf), "copyto", "--retries", "1", "--low-level-retries", "1",
             str(files[10 * MiB]), remote + vpath.lstrip("/")])
    assert r.returncode == 0, f"rclone exit {r.returncode}: {r.stderr}"
    assert_committed(gw, vpath, files[10 * MiB])


def test_lftp_put(gw: Daemon, keys: dict[str, Key], files: dict[int, Path], tmp_path: Path) -> None:
    """lftp over ``ssh -s sftp`` uploads and commits."""
    src = tmp_path / "lftp-10m.bin"
    src.write_bytes(files[10 * MiB].read_bytes())
    connect = (f"ssh -a -x -i {keys['acme'].path} -o IdentitiesOnly=yes -o BatchMode=yes "
               "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    script = (f"set sftp:connect-program '{connect}'; set net:max-retries 1; set cmd:fail-exit yes; "
              f"put {src} -o /lftp-10m.bin; bye")
    r = run(["lftp", "-u", "acme-erp,", "-p", str(gw.port), "-e", script, "sftp://127.0.0.1"],
            stdin=subprocess.DEVNULL, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, f"lftp exit {r.returncode}: {r.stdout} {r.stderr}"
    assert_committed(gw, "/lftp-10m.bin", src)


def test_curl_upload(gw: Daemon, keys: dict[str, Key], files: dict[int, Path]) -> None:
    """curl (libssh2 1.10: aes-ctr + hmac-sha2, no AEAD) uploads with ``-T`` and commits.

    Debian 12's libssh2 (OpenSSL backend) reads the OpenSSH-format ed25519 key as is, so no
    RSA/ECDSA or PEM key is needed.
    """
    vpath = "/curl-10m.bin"
    r = run(["curl", "-sS", "--key", str(keys["acme"].path), "--pubkey", str(keys["acme"].path) + ".pub",
             "-k", "-T", str(files[10 * MiB]), f"sftp://acme-erp@127.0.0.1:{gw.port}{vpath}"])
    assert r.returncode == 0, f"curl exit {r.returncode}: {r.stderr}"
    assert_committed(gw, vpath, files[10 * MiB])
