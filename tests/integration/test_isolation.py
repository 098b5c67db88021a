"""Tenant chroot and per-user permissions, exercised with real OpenSSH ``sftp`` and paramiko.

Every refusal is checked twice: the client sees an error (with no real server path in it), and
the disk shows nothing changed outside the user's own inbox.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterator

import paramiko
import pytest

from tests.conftest import ALL_PERMS, two_tenants
from tests.helpers import (Daemon, Key, base_config, free_port, paramiko_session, run_daemon,
                           sha256_file)

# -- helpers ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` without following symlinks: relative path → kind (+ content)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = "file:" + sha256_file(p)
    return out


def assert_no_leak(d: Daemon, text: str) -> None:
    """Client-visible text never names a real server path."""
    for secret in (str(d.spool), str(d.workdir), str(d.spool.resolve())):
        assert secret not in text, f"server path {secret!r} leaked to the client: {text!r}"


def sftp_fails(d: Daemon, key: Key, user: str, command: str, cwd: Path) -> str:
    """Run one ``sftp -b`` command that must fail; return its stderr (checked for leaks)."""
    r = d.sftp(key, user, command + "\n", cwd=cwd, timeout=60)
    assert r.returncode != 0, f"{command!r} should have failed:\n{r.stdout}\n{r.stderr}"
    assert_no_leak(d, r.stdout + r.stderr)
    return r.stderr


def sftp_ok(d: Daemon, key: Key, user: str, commands: str, cwd: Path) -> str:
    """Run ``sftp -b`` commands that must all succeed; return stdout."""
    r = d.sftp(key, user, commands + "\n", cwd=cwd, timeout=60)
    assert r.returncode == 0, f"{commands!r} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def pm_fails(d: Daemon, fn: Any, *args: Any) -> IOError:
    """Call a paramiko SFTP method that must raise IOError; check the text for leaks."""
    with pytest.raises(IOError) as info:
        fn(*args)
    assert_no_leak(d, str(info.value) + repr(info.value.args))
    return info.value


def write_remote(client: paramiko.SFTPClient, path: str | bytes, data: bytes) -> None:
    """Upload ``data`` with paramiko (the close commits)."""
    with client.open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """A client-side working folder with a small file ``f.txt`` (use relative names in commands)."""
    d = tmp_path / "client"
    d.mkdir()
    (d / "f.txt").write_bytes(b"local content\n")
    return d


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> Iterator[Daemon]:
    """A two-tenant daemon shared by tests that only check their own uniquely named files."""
    work = tmp_path_factory.mktemp("shared")
    with run_daemon(work, base_config(work, free_port(), two_tenants(keys))) as d:
        yield d


@pytest.fixture
def seeded(daemon: Daemon, keys: dict[str, Key]) -> Daemon:
    """The two-tenant daemon with ``/secret.txt`` uploaded by globex and ``/mine.txt`` by acme."""
    with paramiko_session(daemon, "globex-1", keys["globex"]) as g:
        write_remote(g, "/secret.txt", b"globex secret\n")
    with paramiko_session(daemon, "acme-erp", keys["acme"]) as a:
        write_remote(a, "/mine.txt", b"acme data\n")
    assert (daemon.inbox("globex") / "secret.txt").read_bytes() == b"globex secret\n"
    return daemon


# -- tenant separation --------------------------------------------------------------------------


def test_tenants_cannot_list_read_or_change_each_other(seeded: Daemon, keys: dict[str, Key],
                                                       local: Path) -> None:
    """acme sees only its own inbox; every operation on globex's file fails and changes nothing."""
    d, k = seeded, keys["acme"]
    globex_before = snapshot(d.inbox("globex"))
    listing = sftp_ok(d, k, "acme-erp", "ls -1a /", local)
    assert "mine.txt" in listing and "secret.txt" not in listing
    for cmd in ("get /secret.txt got.txt", "get ../globex/inbox/secret.txt got.txt",
                "get ../../globex/inbox/secret.txt got.txt", "rm /secret.txt",
                "rename /secret.txt /stolen.txt", "rename ../../globex/inbox/secret.txt /stolen.txt",
                "ls ../globex", "ls /../../globex/inbox", "put f.txt ../globex/inbox/x.txt",
                "put f.txt ../../globex/inbox/x.txt"):
        sftp_fails(d, k, "acme-erp", cmd, local)
    assert not (local / "got.txt").exists()
    with paramiko_session(d, "acme-erp", k) as c:
        assert sorted(c.listdir("/")) == ["mine.txt"]
        assert sorted(c.listdir("/..")) == ["mine.txt"]
        pm_fails(d, c.open, "/secret.txt", "rb")
        pm_fails(d, c.open, "/../globex/inbox/secret.txt", "rb")
        pm_fails(d, c.remove, "/../../globex/inbox/secret.txt")
        pm_fails(d, c.rename, "/mine.txt", "/../../globex/inbox/mine.txt")
        pm_fails(d, c.stat, "/../globex/inbox/secret.txt")
    assert snapshot(d.inbox("globex")) == globex_before
    assert sorted(snapshot(d.inbox("acme"))) == ["mine.txt"]


def test_same_name_in_two_tenants_stays_separate(daemon: Daemon, keys: dict[str, Key]) -> None:
    """The same path written by two tenants gives two files, each reading back its own bytes."""
    with paramiko_session(daemon, "acme-erp", keys["acme"]) as a, \
            paramiko_session(daemon, "globex-1", keys["globex"]) as g:
        write_remote(a, "/same.txt", b"from acme")
        write_remote(g, "/same.txt", b"from globex")
        with a.open("/same.txt", "rb") as f:
            assert f.read() == b"from acme"
        with g.open("/same.txt", "rb") as f:
            assert f.read() == b"from globex"
    assert (daemon.inbox("acme") / "same.txt").read_bytes() == b"from acme"
    assert (daemon.inbox("globex") / "same.txt").read_bytes() == b"from globex"


def test_directory_named_like_other_tenant_is_own(daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``put ../globex/x`` after ``mkdir /globex`` lands in acme's own ``globex`` folder."""
    sftp_ok(daemon, keys["acme"], "acme-erp", "mkdir /globex\nput f.txt ../globex/x.txt", local)
    assert (daemon.inbox("acme") / "globex" / "x.txt").read_bytes() == b"local content\n"
    assert snapshot(daemon.inbox("globex")) == {}


# -- escapes ------------------------------------------------------------------------------------


def test_dotdot_uploads_resolve_inside_root(daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``..`` stops at ``/``: uploads to ``../../x`` land in the inbox, never above it."""
    sftp_ok(daemon, keys["acme"], "acme-erp", "put f.txt ../../x1.txt\nput f.txt /../../../../x2.txt", local)
    with paramiko_session(daemon, "acme-erp", keys["acme"]) as c:
        write_remote(c, "../../../x3.txt", b"p")
        write_remote(c, "/a/../../b/../x4.txt", b"p")
    assert sorted(snapshot(daemon.inbox("acme"))) == ["x1.txt", "x2.txt", "x3.txt", "x4.txt"]
    inbox = daemon.inbox("acme")
    for up in (1, 2, 3, 4):
        above = inbox.joinpath(*[".."] * up).resolve()
        for n in (1, 2, 3, 4):
            assert not (above / f"x{n}.txt").exists(), f"upload escaped to {above}"


def test_get_outside_root_fails(daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``get ../../../../etc/passwd`` and friends fail without revealing anything."""
    for remote in ("../../../../etc/passwd", "/etc/passwd", "/../../../../../../etc/hostname"):
        err = sftp_fails(daemon, keys["acme"], "acme-erp", f"get {remote} out.txt", local)
        assert "not found" in err.lower() or "no such file" in err.lower(), err
    assert not (local / "out.txt").exists()
    with paramiko_session(daemon, "acme-erp", keys["acme"]) as c:
        exc = pm_fails(daemon, c.open, "../../../../etc/passwd", "rb")
        assert isinstance(exc, FileNotFoundError)


REALPATHS = {"/..": "/", "..": "/", "../..": "/", ".": "/", "/../../../etc": "/etc", "a/../../..": "/",
             "/./x/./../y/..": "/", "//x//y/": "/x/y", "../../globex/inbox": "/globex/inbox"}


def test_realpath_never_leaves_root(shared: Daemon, keys: dict[str, Key]) -> None:
    """paramiko ``normalize`` (SSH_FXP_REALPATH) always answers a path inside ``/``."""
    with paramiko_session(shared, "acme-erp", keys["acme"]) as c:
        got = {raw: c.normalize(raw) for raw in REALPATHS}
    assert got == REALPATHS
    for answer in got.values():
        assert_no_leak(shared, answer)


def test_cd_dotdot_stays_at_root(shared: Daemon, keys: dict[str, Key], local: Path) -> None:
    """OpenSSH ``cd ..`` from ``/`` stays at ``/``."""
    out = sftp_ok(shared, keys["acme"], "acme-erp", "cd ..\ncd ../..\npwd", local)
    assert "Remote working directory: /\n" in out


def test_symlink_and_hardlink_creation_refused(seeded: Daemon, keys: dict[str, Key], local: Path) -> None:
    """SSH_FXP_SYMLINK (paramiko, ``ln -s``) and hard links (``ln``) are refused; no link appears."""
    d, k = seeded, keys["acme"]
    before = snapshot(d.inbox("acme"))
    links_before = os.lstat(d.inbox("acme") / "mine.txt").st_nlink
    with paramiko_session(d, "acme-erp", k) as c:
        for target in ("/etc/passwd", "/mine.txt", "../../globex/inbox/secret.txt", str(d.inbox("globex"))):
            exc = pm_fails(d, c.symlink, target, "/link")
            assert isinstance(exc, PermissionError)
        pm_fails(d, c.readlink, "/mine.txt")
        # OpenSSH's hard link extension, sent raw: the server must refuse it, not just not advertise it.
        for src in ("/mine.txt", "/../../globex/inbox/secret.txt", "/etc/passwd"):
            pm_fails(d, c._request, paramiko.sftp.CMD_EXTENDED, "hardlink@openssh.com", src, "/hard")
        assert c.normalize(".") == "/"
    sftp_fails(d, k, "acme-erp", "ln -s /etc/passwd /link", local)
    sftp_fails(d, k, "acme-erp", "ln -s /mine.txt /link", local)
    sftp_fails(d, k, "acme-erp", "ln /mine.txt /hard", local)
    assert snapshot(d.inbox("acme")) == before
    assert os.lstat(d.inbox("acme") / "mine.txt").st_nlink == links_before


@pytest.fixture
def planted(seeded: Daemon) -> Daemon:
    """Symlinks put straight onto disk in acme's inbox, pointing out of it."""
    inbox = seeded.inbox("acme")
    os.symlink("/etc", inbox / "etc_link")
    os.symlink("/etc/passwd", inbox / "passwd_link")
    os.symlink(seeded.inbox("globex"), inbox / "globex_link")
    os.symlink(seeded.inbox("globex") / "secret.txt", inbox / "secret_link")
    os.symlink("../../globex/inbox", inbox / "relative_link")
    return seeded


def test_planted_symlinks_never_followed_paramiko(planted: Daemon, keys: dict[str, Key]) -> None:
    """open/stat/list/put through a planted symlink never reach its target."""
    d = planted
    globex_before = snapshot(d.inbox("globex"))
    passwd_size = os.stat("/etc/passwd").st_size
    with paramiko_session(d, "acme-erp", keys["acme"]) as c:
        entries = {a.filename: a for a in c.listdir_attr("/")}
        for name in ("etc_link", "passwd_link", "globex_link", "secret_link", "relative_link"):
            assert stat.S_ISLNK(entries[name].st_mode or 0), f"{name} listed as its target"
            assert stat.S_ISLNK(c.stat("/" + name).st_mode or 0)
        for path in ("/passwd_link", "/secret_link", "/etc_link/passwd", "/globex_link/secret.txt",
                     "/relative_link/secret.txt"):
            pm_fails(d, c.open, path, "rb")
        for path in ("/etc_link/passwd", "/globex_link/secret.txt", "/relative_link/secret.txt"):
            pm_fails(d, c.stat, path)
        for path in ("/etc_link", "/globex_link", "/relative_link"):
            pm_fails(d, c.listdir, path)
        for path in ("/globex_link/new.txt", "/relative_link/new.txt", "/etc_link/new.txt",
                     "/secret_link", "/passwd_link"):
            pm_fails(d, write_remote, c, path, b"planted")
        pm_fails(d, c.mkdir, "/globex_link/sub")
        pm_fails(d, c.rename, "/mine.txt", "/globex_link/mine.txt")
        pm_fails(d, c.rename, "/secret_link", "/moved_link")
        pm_fails(d, c.utime, "/secret_link", (1, 1))
        pm_fails(d, c.remove, "/globex_link/secret.txt")
        assert all((a.st_size or 0) != passwd_size or not stat.S_ISREG(a.st_mode or 0)
                   for a in c.listdir_attr("/"))
    assert snapshot(d.inbox("globex")) == globex_before
    assert not Path("/etc/new.txt").exists()
    assert os.path.islink(d.inbox("acme") / "secret_link")


def test_planted_symlinks_never_followed_openssh(planted: Daemon, keys: dict[str, Key], local: Path) -> None:
    """The same with OpenSSH sftp: get, put and cd through a planted symlink fail; ls shows the
    link itself, never the target's contents."""
    d, k = planted, keys["acme"]
    globex_before = snapshot(d.inbox("globex"))
    for cmd in ("get /passwd_link out.txt", "get /secret_link out.txt", "get /etc_link/passwd out.txt",
                "get /globex_link/secret.txt out.txt", "get /relative_link/secret.txt out.txt",
                "ls /etc_link/passwd", "ls /globex_link/secret.txt", "put f.txt /globex_link/new.txt",
                "put f.txt /etc_link/new.txt", "put f.txt /secret_link", "cd /globex_link", "cd /etc_link"):
        sftp_fails(d, k, "acme-erp", cmd, local)
    for cmd in ("ls /etc_link/", "ls -l /globex_link", "ls -la /relative_link/"):
        r = d.sftp(k, "acme-erp", cmd + "\n", cwd=local, timeout=60)
        assert_no_leak(d, r.stdout + r.stderr)
        for inside in ("passwd", "hostname", "secret.txt"):
            assert inside not in r.stdout, f"{cmd!r} listed the symlink target:\n{r.stdout}"
    assert not (local / "out.txt").exists()
    assert snapshot(d.inbox("globex")) == globex_before


def test_rename_outside_root_stays_inside(seeded: Daemon, keys: dict[str, Key], local: Path) -> None:
    """A rename target with ``..`` resolves inside the root or fails; nothing leaves the inbox."""
    d = seeded
    globex_before = snapshot(d.inbox("globex"))
    sftp_ok(d, keys["acme"], "acme-erp", "rename /mine.txt ../../../moved.txt", local)
    sftp_fails(d, keys["acme"], "acme-erp", "rename /moved.txt ../globex/inbox/moved.txt", local)
    with paramiko_session(d, "acme-erp", keys["acme"]) as c:
        c.posix_rename("/moved.txt", "/../../../../tmp/../moved2.txt")
        pm_fails(d, c.rename, "/moved2.txt", "/../../globex/inbox/moved.txt")
    assert snapshot(d.inbox("acme")) == {"moved2.txt": "file:" + sha256_file(d.inbox("acme") / "moved2.txt")}
    assert (d.inbox("acme") / "moved2.txt").read_bytes() == b"acme data\n"
    assert snapshot(d.inbox("globex")) == globex_before
    for p in (d.spool / "moved.txt", d.spool.parent / "moved.txt", d.spool / "acme" / "moved.txt"):
        assert not p.exists()


def test_error_texts_never_show_server_paths(planted: Daemon, keys: dict[str, Key], local: Path) -> None:
    """A sweep of failing requests: no error text names the spool or work directory."""
    d = planted
    texts: list[str] = []
    with paramiko_session(d, "acme-erp", keys["acme"]) as c:
        calls: list[tuple[Any, tuple[Any, ...]]] = [
            (c.open, ("/missing/x", "rb")), (c.open, ("/nope", "rb")), (c.listdir, ("/nope",)),
            (c.mkdir, ("/mine.txt",)), (c.rmdir, ("/nope",)), (c.remove, ("/",)), (c.remove, ("/nope",)),
            (c.rename, ("/nope", "/x")), (c.rename, ("/mine.txt", "/mine.txt")), (c.stat, ("/etc_link/x",)),
            (c.symlink, ("/etc", "/l")), (c.readlink, ("/etc_link",)), (c.listdir, ("/mine.txt",)),
            (c.open, ("/mine.txt/x", "wb")), (c.rmdir, ("/",)), (c.open, ("/", "rb")),
            (c.open, ("/" + "n" * 300, "rb")), (c.open, (b"/bad\xff", "rb")),
        ]
        c.mkdir("/full")
        write_remote(c, "/full/f", b"x")
        calls.append((c.rmdir, ("/full",)))
        for fn, args in calls:
            exc = pm_fails(d, fn, *args)
            texts.append(str(exc))
    for cmd in ("get /nope out", "ls /nope", "rmdir /full", "rm /", "mkdir /mine.txt", "cd /mine.txt",
                "get /etc_link/passwd out", "ln -s /a /b", "chmod 777 /nope"):
        texts.append(sftp_fails(d, keys["acme"], "acme-erp", cmd, local))
    assert len(texts) == len(calls) + 9
    assert "/spool" not in "".join(texts)


# -- hostile names ------------------------------------------------------------------------------

HOSTILE: list[bytes] = [
    b"/nul\x00byte.txt", b"/new\nline.txt", b"/tab\there.txt", b"/esc\x1b[31m.txt", b"/del\x7f.txt",
    b"/bad-utf8-\xff\xfe.txt", b"/overlong-\xc0\xaf.txt", b"/" + b"n" * 300,
    b"/" + b"/".join([b"d" * 200] * 25),
]


@pytest.mark.parametrize("name", HOSTILE, ids=["nul", "newline", "tab", "escape", "del", "bad-utf8",
                                                "overlong-utf8", "name-300", "path-5000"])
def test_hostile_names_get_clean_errors(shared: Daemon, keys: dict[str, Key], local: Path, name: bytes,
                                        request: pytest.FixtureRequest) -> None:
    """Bad bytes or lengths fail cleanly for every request kind; the session and daemon go on."""
    d = shared
    tag = request.node.callspec.id
    with paramiko_session(d, "acme-erp", keys["acme"]) as c:
        write_remote(c, f"/ok-{tag}.txt", b"ok")
        pm_fails(d, write_remote, c, name, b"data")
        pm_fails(d, c.open, name, "rb")
        pm_fails(d, c.mkdir, name)
        pm_fails(d, c.stat, name)
        pm_fails(d, c.listdir, name)
        pm_fails(d, c.rename, f"/ok-{tag}.txt", name)
        pm_fails(d, c.remove, name)
        pm_fails(d, c.normalize, name)
        # The same session still works.
        assert f"ok-{tag}.txt" in c.listdir("/")
    assert all(n.startswith("ok-") for n in snapshot(d.inbox("acme"))), snapshot(d.inbox("acme"))
    assert d.proc.poll() is None
    sftp_ok(d, keys["globex"], "globex-1", f"put f.txt /after-{tag}.txt", local)
    assert (d.inbox("globex") / f"after-{tag}.txt").read_bytes() == b"local content\n"
    assert f"/after-{tag}.txt" in [t["path"] for t in d.transfers("--tenant", "globex")]


def test_long_names_with_openssh(daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """OpenSSH sftp: a 300-byte name fails, a 255-byte name works, then others can still upload."""
    sftp_fails(daemon, keys["acme"], "acme-erp", "put f.txt /" + "a" * 300, local)
    sftp_ok(daemon, keys["acme"], "acme-erp", "put f.txt /" + "b" * 255, local)
    assert sorted(snapshot(daemon.inbox("acme"))) == ["b" * 255]
    sftp_ok(daemon, keys["globex"], "globex-1", "put f.txt /after.txt", local)
    assert (daemon.inbox("globex") / "after.txt").exists()


# -- permissions --------------------------------------------------------------------------------


def test_default_permissions_upload_list_mkdir_only(seeded: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``acme-drop`` (upload, list, mkdir) can add files but never read, delete, rename or overwrite."""
    d, k = seeded, keys["acme2"]
    sftp_ok(d, k, "acme-drop", "put f.txt /drop.txt\nmkdir /dir\nput f.txt /dir/inner.txt", local)
    listing = sftp_ok(d, k, "acme-drop", "ls -1 /\nls -1 /dir", local)
    assert "drop.txt" in listing and "mine.txt" in listing and "inner.txt" in listing
    before = snapshot(d.inbox("acme"))
    for cmd in ("get /drop.txt out.txt", "get /mine.txt out.txt", "rm /drop.txt", "rm /mine.txt",
                "rmdir /dir", "rename /drop.txt /renamed.txt", "rename /dir /dir2",
                "put f.txt /mine.txt", "put f.txt /drop.txt", "put f.txt /dir/inner.txt"):
        sftp_fails(d, k, "acme-drop", cmd, local)
    assert not (local / "out.txt").exists()
    with paramiko_session(d, "acme-drop", k) as c:
        for fn, args in ((c.open, ("/mine.txt", "rb")), (c.open, ("/mine.txt", "ab")),
                         (c.open, ("/mine.txt", "r+b")), (c.open, ("/mine.txt", "wb")),
                         (c.remove, ("/mine.txt",)), (c.rename, ("/mine.txt", "/x")),
                         (c.posix_rename, ("/drop.txt", "/mine.txt")), (c.rmdir, ("/dir",))):
            pm_fails(d, fn, *args)
        with c.open("/drop2.txt", "wb") as f:
            f.write(b"abc")
            with pytest.raises(IOError):
                f.read(3)
    after = snapshot(d.inbox("acme"))
    assert after.pop("drop2.txt") == "file:" + sha256_file(d.inbox("acme") / "drop2.txt")
    assert after == before


def test_put_preserve_times_on_fresh_upload(daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``put -p`` by a default-permission user works and the stored file keeps the mtime."""
    os.utime(local / "f.txt", (1_000_000_000, 1_000_000_000))
    sftp_ok(daemon, keys["acme2"], "acme-drop", "put -p f.txt /kept.txt", local)
    stored = daemon.inbox("acme") / "kept.txt"
    assert stored.read_bytes() == b"local content\n"
    assert int(stored.stat().st_mtime) == 1_000_000_000
    assert [t["path"] for t in daemon.transfers()] == ["/kept.txt"]


@pytest.fixture
def perm_daemon(tmp_path: Path, keys: dict[str, Key]) -> Iterator[Daemon]:
    """One tenant whose users (all with the same key) each hold a different permission set."""
    k = keys["acme"].pub
    users = [{"name": name, "authorized_keys": [k], "permissions": perms} for name, perms in (
        ("admin", ALL_PERMS), ("reader", ["download"]), ("lister", ["list"]),
        ("writer", ["upload", "overwrite"]), ("mover", ["upload", "rename", "list"]),
        ("cleaner", ["list", "delete"]))]
    port = free_port()
    with run_daemon(tmp_path, base_config(tmp_path, port, {"t": {"users": users}})) as d:
        r = d.sftp(keys["acme"], "admin", "put /etc/hostname /a.txt\nput /etc/hostname /b.txt\nmkdir /d\n")
        assert r.returncode == 0, r.stderr
        yield d


def test_download_only_user(perm_daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``[download]``: get works; ls, put, mkdir, rm are refused."""
    d, k = perm_daemon, keys["acme"]
    sftp_ok(d, k, "reader", "get /a.txt a.txt", local)
    assert (local / "a.txt").read_bytes() == Path("/etc/hostname").read_bytes()
    for cmd in ("ls /", "put f.txt /new.txt", "mkdir /m", "rm /a.txt", "rename /a.txt /z.txt"):
        sftp_fails(d, k, "reader", cmd, local)
    assert sorted(snapshot(d.inbox("t"))) == ["a.txt", "b.txt", "d"]


def test_list_only_user(perm_daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``[list]``: ls works; get and put are refused."""
    d, k = perm_daemon, keys["acme"]
    assert "a.txt" in sftp_ok(d, k, "lister", "ls -1 /", local)
    for cmd in ("get /a.txt a.txt", "put f.txt /new.txt", "mkdir /m"):
        sftp_fails(d, k, "lister", cmd, local)
    assert not (local / "a.txt").exists()
    assert sorted(snapshot(d.inbox("t"))) == ["a.txt", "b.txt", "d"]


def test_overwrite_user_replaces_but_cannot_delete(perm_daemon: Daemon, keys: dict[str, Key],
                                                   local: Path) -> None:
    """``[upload, overwrite]``: re-putting an existing name replaces it; rm and rename are refused."""
    d, k = perm_daemon, keys["acme"]
    sftp_ok(d, k, "writer", "put f.txt /a.txt", local)
    assert (d.inbox("t") / "a.txt").read_bytes() == b"local content\n"
    for cmd in ("rm /a.txt", "rename /a.txt /z.txt", "get /a.txt out.txt", "mkdir /m"):
        sftp_fails(d, k, "writer", cmd, local)
    assert sorted(snapshot(d.inbox("t"))) == ["a.txt", "b.txt", "d"]


def test_rename_user_cannot_rename_over_existing(perm_daemon: Daemon, keys: dict[str, Key],
                                                 local: Path) -> None:
    """``[upload, rename, list]``: rename works, but replacing an existing file needs overwrite."""
    d, k = perm_daemon, keys["acme"]
    sftp_ok(d, k, "mover", "rename /a.txt /d/a2.txt", local)
    with paramiko_session(d, "mover", k) as c:
        pm_fails(d, c.posix_rename, "/d/a2.txt", "/b.txt")
        pm_fails(d, c.remove, "/b.txt")
    assert sorted(snapshot(d.inbox("t"))) == ["b.txt", "d", "d/a2.txt"]


def test_delete_user_removes_but_cannot_upload(perm_daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """``[list, delete]``: rm and rmdir work; put is refused."""
    d, k = perm_daemon, keys["acme"]
    sftp_ok(d, k, "cleaner", "rm /a.txt\nrmdir /d", local)
    sftp_fails(d, k, "cleaner", "put f.txt /new.txt", local)
    assert sorted(snapshot(d.inbox("t"))) == ["b.txt"]


def test_permissions_checked_per_request_not_per_tenant(perm_daemon: Daemon, keys: dict[str, Key]) -> None:
    """Two sessions of one tenant at once: each request is judged by its own user's permissions."""
    d, k = perm_daemon, keys["acme"]
    with paramiko_session(d, "reader", k) as r, paramiko_session(d, "writer", k) as w:
        write_remote(w, "/w.txt", b"written")
        pm_fails(d, write_remote, r, "/r.txt", b"nope")
        with r.open("/w.txt", "rb") as f:
            assert f.read() == b"written"
        pm_fails(d, w.open, "/w.txt", "rb")
    assert sorted(snapshot(d.inbox("t"))) == ["a.txt", "b.txt", "d", "w.txt"]


def test_openssh_sftp_refusal_is_reported(daemon: Daemon, keys: dict[str, Key], local: Path) -> None:
    """The client-facing reason for a refused download is 'Permission denied'."""
    sftp_ok(daemon, keys["acme2"], "acme-drop", "put f.txt /x.txt", local)
    err = sftp_fails(daemon, keys["acme2"], "acme-drop", "get /x.txt out.txt", local)
    assert "permission denied" in err.lower(), err
