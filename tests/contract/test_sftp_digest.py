"""The sftp destination's remote digest: openssl first, sha256sum next, remembered per destination."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relayd.relay.destinations.sftp import DigestCommands, SftpDestination, _openssl_command, _parse_digests
from tests.contract.conftest import DestEnv, Remote, run
from tests.helpers import sha256_file


def test_digest_commands_learn_what_works() -> None:
    d = DigestCommands()
    assert d.order() == ["openssl", "sha256sum"]
    d.failed("openssl")  # missing on this server: not tried again
    d.worked("sha256sum")
    assert d.order() == ["sha256sum"]
    d = DigestCommands()
    d.worked("openssl")
    d.failed("openssl")  # known to work: a one-off failure does not disable it
    assert d.order() == ["openssl", "sha256sum"]
    d = DigestCommands()
    d.failed("openssl")
    d.failed("sha256sum")  # neither works: still one exec per file, as before
    assert d.order() == ["sha256sum"]


def test_openssl_command_quotes_and_guards_dash() -> None:
    assert _openssl_command(["/a b/c.part"]) == "openssl dgst -sha256 -r '/a b/c.part'"
    assert _openssl_command(["-x.part"]) == "openssl dgst -sha256 -r ./-x.part"
    assert _openssl_command(["/a", "/b c"]) == "openssl dgst -sha256 -r /a '/b c'"


def test_parse_digests_matches_by_path() -> None:
    a, b = "a" * 64, "b" * 64
    out = f"{a} */x/one\n{b}  /x/two words\nopenssl: /x/three: No such file\n\\{a}  /x/esc\n"
    assert _parse_digests(out, ["/x/one", "/x/two words", "/x/three", "/x/esc"]) == {
        "/x/one": a, "/x/two words": b}
    assert _parse_digests(f"{a} */x/other\n", ["/x/one"]) == {}


def test_sftp_uses_openssl_digest(remote: Remote, tmp_path: Path) -> None:
    root = tmp_path / "dest"
    root.mkdir()
    env = DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)
    p = env.payload("/dg.bin", size=1_000_003, seed=21)

    async def body() -> tuple[str, str | None]:
        dest = env.make()
        assert isinstance(dest, SftpDestination)
        dest.readback_max = 0  # small files are read back; this test is about the exec path
        try:
            out = await dest.deliver(p)
            return out.verified, dest.digest.working
        finally:
            await dest.close()

    assert run(body()) == ("sha256", "openssl")
    assert sha256_file(root / "dg.bin") == p.sha256


def test_sftp_without_exec_tries_one_command_per_file(sftp_only_remote: Remote, tmp_path: Path) -> None:
    root = tmp_path / "dest"
    root.mkdir()
    env = DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=sftp_only_remote)

    async def body() -> list[str]:
        dest = env.make()
        assert isinstance(dest, SftpDestination)
        dest.readback_max = 1000
        try:
            out = await dest.deliver(env.payload("/a.bin", size=5000, seed=22))
            assert out.verified == "size" and "verified size only" in out.note
            small = await dest.deliver(env.payload("/s.bin", size=900, seed=23))
            assert small.verified == "sha256" and not small.note  # read back: no exec needed
            return dest.digest.order()
        finally:
            await dest.close()

    assert run(body()) == ["sha256sum"]


def _many_at_once(remote: Remote, tmp_path: Path, prefix: str, seed: int,
                  readback_max: int | None = None) -> tuple[list[str], int]:
    """Deliver 40 small files at once; (verification methods, execs). Checks every delivered file."""
    root = tmp_path / "dest"
    root.mkdir()
    env = DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)
    payloads = [env.payload(f"/{prefix}/f{k:02d}.bin", size=3000 + k, seed=seed + k) for k in range(40)]

    async def body() -> tuple[list[str], int]:
        dest = env.make()
        assert isinstance(dest, SftpDestination)
        if readback_max is not None:
            dest.readback_max = readback_max
        try:
            outs = await asyncio.gather(*(dest.deliver(p) for p in payloads))
            return [o.verified for o in outs], dest.digests.execs
        finally:
            await dest.close()

    verified, execs = run(body())
    for p in payloads:
        assert sha256_file(root / p.path.lstrip("/")) == p.sha256
    return verified, execs


def test_concurrent_digests_share_execs(remote: Remote, tmp_path: Path) -> None:
    """Forty deliveries at once, read-back off: every file verified by SHA-256, few execs."""
    verified, execs = _many_at_once(remote, tmp_path, "many", 100, readback_max=0)
    assert verified == ["sha256"] * 40
    assert execs < 20, execs


def test_small_files_verified_by_reading_back(remote: Remote, tmp_path: Path) -> None:
    """Small files while the destination is not busy: SHA-256 of what the server stored, read
    back over SFTP, no exec at all (busy destinations batch them into execs, see above)."""
    root = tmp_path / "dest"
    root.mkdir()
    env = DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)
    payloads = [env.payload(f"/rb/f{k}.bin", size=20_000 + k, seed=300 + k) for k in range(10)]

    async def body() -> tuple[list[str], int]:
        dest = env.make()
        assert isinstance(dest, SftpDestination)
        try:
            outs = [await dest.deliver(p) for p in payloads[:5]]
            outs += await asyncio.gather(*(dest.deliver(p) for p in payloads[5:]))  # 5 < BATCH_DIGESTS_FROM
            return [o.verified for o in outs], dest.digests.execs
        finally:
            await dest.close()

    verified, execs = run(body())
    assert verified == ["sha256"] * 10 and execs == 0


def test_busy_destination_batches_small_file_digests(remote: Remote, tmp_path: Path) -> None:
    """Many small deliveries at once: hashed by a few batched execs instead of read back one by one."""
    verified, execs = _many_at_once(remote, tmp_path, "busy", 500)
    assert verified == ["sha256"] * 40
    assert 0 < execs < 20, execs
