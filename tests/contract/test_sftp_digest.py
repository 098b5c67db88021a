"""The sftp destination's remote digest: openssl first, sha256sum next, remembered per destination."""

from __future__ import annotations

from pathlib import Path

from relayd.relay.destinations.sftp import DigestCommands, SftpDestination, _openssl_command
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
    assert _openssl_command("/a b/c.part") == "openssl dgst -sha256 -r '/a b/c.part'"
    assert _openssl_command("-x.part") == "openssl dgst -sha256 -r ./-x.part"


def test_sftp_uses_openssl_digest(remote: Remote, tmp_path: Path) -> None:
    root = tmp_path / "dest"
    root.mkdir()
    env = DestEnv(kind="sftp", tmp=tmp_path, root=root, remote=remote)
    p = env.payload("/dg.bin", size=1_000_003, seed=21)

    async def body() -> tuple[str, str | None]:
        dest = env.make()
        assert isinstance(dest, SftpDestination)
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
        try:
            out = await dest.deliver(env.payload("/a.bin", size=5000, seed=22))
            assert out.verified == "size" and "verified size only" in out.note
            return dest.digest.order()
        finally:
            await dest.close()

    assert run(body()) == ["sha256sum"]
