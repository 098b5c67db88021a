"""Authentication and the SSH surface: keys, passwords, OpenSSH certificates, auth-failure limits,
refused channel types and the algorithm policy. Real OpenSSH and paramiko clients only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import bcrypt
import paramiko
import pytest
import yaml

from tests.conftest import ALL_PERMS
from tests.helpers import (REPO, Daemon, Key, base_config, free_port, make_key, paramiko_session, relayd,
                           run_daemon, ssh, ssh_opts, wait_for)

ARGON_PASSWORD = "correct horse battery staple"
BCRYPT_PASSWORD = "Tr0ub4dor&3-bcrypt"
WRONG_PASSWORDS = ("wrong-canary-3b9f1c", "wrong-canary-77ad02", "wrong-canary-e41d5a")


def hash_password(password: str) -> str:
    """An argon2id hash made by ``relayd hash-password --stdin``."""
    r = subprocess.run([sys.executable, "-m", "relayd.cli", "hash-password", "--stdin"], input=password + "\n",
                       capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    line = r.stdout.strip()
    assert line.startswith("$argon2id$"), r.stdout
    return line


def sign(ca: Key, key: Key, out_dir: Path, name: str, principals: str | None,
         validity: str | None = "-5m:+1h") -> Path:
    """Sign ``key`` with ``ca`` via ssh-keygen; return the certificate path (``<name>-cert.pub``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pub = out_dir / f"{name}.pub"
    if pub != Path(str(key.path) + ".pub"):
        shutil.copy(str(key.path) + ".pub", pub)
    args = ["ssh-keygen", "-q", "-s", str(ca.path), "-I", f"id-{name}"]
    if principals is not None:
        args += ["-n", principals]
    if validity is not None:
        args += ["-V", validity]
    subprocess.run([*args, str(pub)], check=True, capture_output=True)
    cert = out_dir / f"{name}-cert.pub"
    assert cert.exists()
    return cert


def connects(d: Daemon, key: Key, user: str, *opts: str) -> subprocess.CompletedProcess[str]:
    """One ``sftp -b`` session that runs ``pwd``."""
    return d.sftp(key, user, "pwd\n", *opts, timeout=60)


def negotiate(d: Daemon, key: Key, user: str, *opts: str) -> subprocess.CompletedProcess[str]:
    """Like :func:`connects`, with LogLevel=INFO so OpenSSH says why a negotiation failed."""
    return subprocess.run(["sftp", "-b", "-", "-o", "LogLevel=INFO", *ssh_opts(d, key), *opts, f"{user}@127.0.0.1"],
                          input="pwd\n", text=True, capture_output=True, timeout=60)


def login_fails(d: Daemon, user: str, key: Key | None = None, password: str | None = None) -> None:
    """A paramiko login that must be refused."""
    with pytest.raises(paramiko.AuthenticationException):
        with paramiko_session(d, user, key=key, password=password):
            pass


def assert_connected(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stderr
    assert "Remote working directory: /" in r.stdout


def assert_auth_refused(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0, f"login should have been refused:\n{r.stdout}"
    assert "Permission denied" in r.stderr, r.stderr
    assert "Remote working directory" not in r.stdout


# -- fixtures -----------------------------------------------------------------------------------


class World:
    """Keys, CAs and a running daemon for the module."""

    def __init__(self, root: Path, keys: dict[str, Key]):
        self.root = root
        self.keys = keys
        kd = root / "authkeys"
        self.ca = make_key(kd, "acme_ca")
        self.other_ca = make_key(kd, "rogue_ca")
        self.cert_key = make_key(kd, "certuser")
        self.placeholder = make_key(kd, "placeholder")
        self.rsa = make_key(kd, "rsauser", kind="rsa")
        self.argon_hash = hash_password(ARGON_PASSWORD)
        self.bcrypt_hash = bcrypt.hashpw(BCRYPT_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        self.daemon: Daemon


def auth_tenants(w: World) -> dict[str, Any]:
    """acme trusts ``acme_ca`` and has key, password, cert and RSA users; globex has one key user."""
    k = w.keys
    return {
        "acme": {
            "cert_authorities": [w.ca.pub],
            "users": [
                {"name": "acme-erp", "authorized_keys": [k["acme"].pub], "permissions": ALL_PERMS},
                {"name": "pw-argon", "password_hash": w.argon_hash},
                {"name": "pw-bcrypt", "password_hash": w.bcrypt_hash},
                # The raw cert key is NOT authorized: only its certificate can log this user in.
                {"name": "cert-user", "authorized_keys": [w.placeholder.pub]},
                {"name": "rsa-user", "authorized_keys": [w.rsa.pub]},
            ],
        },
        "globex": {"users": [{"name": "globex-1", "authorized_keys": [k["globex"].pub]}]},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> Iterator[World]:
    """One daemon for every test here that changes no state."""
    root = tmp_path_factory.mktemp("auth")
    w = World(root, keys)
    work = root / "daemon"
    with run_daemon(work, base_config(work, free_port(), auth_tenants(w))) as d:
        w.daemon = d
        yield w


# -- keys and unknown users ---------------------------------------------------------------------


def test_authorized_key_accepted(world: World) -> None:
    """Control: the right key logs in."""
    assert_connected(connects(world.daemon, world.keys["acme"], "acme-erp"))


def test_wrong_key_refused(world: World) -> None:
    """A key not authorized for the user is refused (OpenSSH and paramiko)."""
    assert_auth_refused(connects(world.daemon, world.keys["stranger"], "acme-erp"))
    assert_auth_refused(connects(world.daemon, world.keys["globex"], "acme-erp"))
    login_fails(world.daemon, "acme-erp", key=world.keys["stranger"])


def test_unknown_user_refused(world: World) -> None:
    """A login name no tenant defines is refused, even with a key that is valid elsewhere."""
    assert_auth_refused(connects(world.daemon, world.keys["acme"], "nobody"))
    assert_auth_refused(connects(world.daemon, world.keys["acme"], "acme"))
    login_fails(world.daemon, "nobody", password=ARGON_PASSWORD)


# -- passwords ----------------------------------------------------------------------------------


def test_argon2id_password_login(world: World) -> None:
    """A user with a ``relayd hash-password`` hash logs in with paramiko and can upload."""
    with paramiko_session(world.daemon, "pw-argon", password=ARGON_PASSWORD) as c:
        with c.open("/argon.txt", "wb") as f:
            f.write(b"argon")
    assert (world.daemon.inbox("acme") / "argon.txt").read_bytes() == b"argon"


def test_bcrypt_password_login(world: World) -> None:
    """A bcrypt ``$2b$`` hash works too."""
    with paramiko_session(world.daemon, "pw-bcrypt", password=BCRYPT_PASSWORD) as c:
        assert c.normalize(".") == "/"


@pytest.mark.parametrize("user, password", [
    ("pw-argon", WRONG_PASSWORDS[0]), ("pw-argon", BCRYPT_PASSWORD), ("pw-bcrypt", WRONG_PASSWORDS[1]),
    ("pw-bcrypt", ARGON_PASSWORD), ("pw-argon", ""), ("acme-erp", ARGON_PASSWORD),
])
def test_wrong_password_refused(world: World, user: str, password: str) -> None:
    """Wrong, empty, or another user's password is refused; so is a password for a key-only user."""
    login_fails(world.daemon, user, password=password)


def test_passwords_never_logged(world: World) -> None:
    """After the password tests, no password ever tried appears in the daemon log."""
    login_fails(world.daemon, "pw-argon", password=WRONG_PASSWORDS[2])
    for user, password in (("pw-argon", ARGON_PASSWORD), ("pw-bcrypt", BCRYPT_PASSWORD)):
        with paramiko_session(world.daemon, user, password=password) as c:
            assert c.normalize(".") == "/"
    wait_for(lambda: "auth failed" in world.daemon.log(), 10, what="auth failure logged")
    log = world.daemon.log()
    for password in (ARGON_PASSWORD, BCRYPT_PASSWORD, *WRONG_PASSWORDS):
        assert password not in log


def test_plaintext_password_is_config_error(tmp_path: Path, keys: dict[str, Key]) -> None:
    """``password:`` in a user is refused by check-config and serve, naming the key path."""
    tenants = {"acme": {"users": [{"name": "u", "password": "hunter2-plaintext"}]}}
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, free_port(), tenants)))
    r = relayd("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "tenants.acme.users[0].password" in out
    assert "Traceback" not in out
    s = relayd("serve", "-c", str(cfg), timeout=30)
    assert s.returncode == 2
    assert "tenants.acme.users[0].password" in s.stdout + s.stderr


# -- certificates -------------------------------------------------------------------------------


def cert_login(w: World, cert: Path, user: str = "cert-user") -> subprocess.CompletedProcess[str]:
    """Log in with the cert key plus ``cert`` as CertificateFile."""
    return connects(w.daemon, w.cert_key, user, "-o", f"CertificateFile={cert}")


def test_cert_for_login_name_accepted(world: World, tmp_path: Path) -> None:
    """A cert from the tenant CA whose principal is the login name is accepted."""
    cert = sign(world.ca, world.cert_key, tmp_path, "good", "cert-user")
    assert_connected(cert_login(world, cert))
    multi = sign(world.ca, world.cert_key, tmp_path, "multi", "someone,cert-user,other")
    assert_connected(cert_login(world, multi))


def test_cert_next_to_key_accepted(world: World, tmp_path: Path) -> None:
    """OpenSSH picks up ``<key>-cert.pub`` next to the private key by itself."""
    key_copy = tmp_path / "k" / "id"
    key_copy.parent.mkdir()
    shutil.copy(world.cert_key.path, key_copy)
    shutil.copy(str(world.cert_key.path) + ".pub", str(key_copy) + ".pub")
    sign(world.ca, Key(key_copy), tmp_path / "k", "id", "cert-user")
    assert (tmp_path / "k" / "id-cert.pub").exists()
    assert_connected(connects(world.daemon, Key(key_copy), "cert-user"))


def test_plain_cert_key_without_cert_refused(world: World) -> None:
    """Control: the certified key alone (no certificate) is not authorized."""
    assert_auth_refused(connects(world.daemon, world.cert_key, "cert-user"))


@pytest.mark.parametrize("case, principals, validity", [
    ("expired", "cert-user", "-2d:-1d"),
    ("not-yet-valid", "cert-user", "+1d:+2d"),
    ("other-principal", "acme-erp", "-5m:+1h"),
    ("no-principals", None, "-5m:+1h"),
    ("prefix-principal", "cert", "-5m:+1h"),
])
def test_bad_cert_refused(world: World, tmp_path: Path, case: str, principals: str | None,
                          validity: str) -> None:
    """Expired, future, wrong-principal and principal-less certificates are refused."""
    cert = sign(world.ca, world.cert_key, tmp_path, case, principals, validity)
    assert_auth_refused(cert_login(world, cert))


def test_cert_from_untrusted_ca_refused(world: World, tmp_path: Path) -> None:
    """A well-formed cert signed by a CA the tenant does not trust is refused."""
    cert = sign(world.other_ca, world.cert_key, tmp_path, "rogue", "cert-user")
    assert_auth_refused(cert_login(world, cert))


def test_tenant_ca_cannot_log_into_other_tenant(world: World, tmp_path: Path) -> None:
    """acme's CA signing a cert for ``globex-1`` does not open globex."""
    cert = sign(world.ca, world.cert_key, tmp_path, "cross", "globex-1")
    assert_auth_refused(cert_login(world, cert, user="globex-1"))


def test_cert_principal_of_other_user_refused(world: World, tmp_path: Path) -> None:
    """A cert naming ``cert-user`` cannot log in as ``acme-erp`` of the same tenant."""
    cert = sign(world.ca, world.cert_key, tmp_path, "other", "cert-user")
    assert_auth_refused(cert_login(world, cert, user="acme-erp"))


def test_cert_only_user_is_valid_config(tmp_path: Path) -> None:
    """A user with no key or password of its own, in a tenant with ``cert_authorities``, is valid
    config: the tenant CA is how it logs in."""
    ca = make_key(tmp_path / "ca", "ca")
    tenants = {"acme": {"cert_authorities": [ca.pub], "users": [{"name": "cert-only"}]}}
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, free_port(), tenants)))
    r = relayd("check-config", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr


# -- max_auth_tries -----------------------------------------------------------------------------


@pytest.fixture
def strict(tmp_path: Path, keys: dict[str, Key]) -> Iterator[Daemon]:
    """A daemon with ``max_auth_tries: 2`` and one password user."""
    tenants = {"acme": {"users": [{"name": "pw", "password_hash": hash_password(ARGON_PASSWORD)}]}}
    with run_daemon(tmp_path, base_config(tmp_path, free_port(), tenants, max_auth_tries=2)) as d:
        yield d


def test_max_auth_tries_disconnects(strict: Daemon) -> None:
    """Two wrong passwords on one paramiko transport: both are checked and logged (with the
    remote address, never the password), then the server ends the connection."""
    sock = socket.create_connection(("127.0.0.1", strict.port), timeout=10)
    remote = "remote=127.0.0.1:%d" % sock.getsockname()[1]
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("pw", WRONG_PASSWORDS[0])
        with pytest.raises(paramiko.SSHException):
            t.auth_password("pw", WRONG_PASSWORDS[1])
        wait_for(lambda: not t.is_active(), 10, what="server to close the transport")
        with pytest.raises(paramiko.SSHException):
            t.auth_password("pw", ARGON_PASSWORD)
        assert not t.is_authenticated()
    finally:
        t.close()

    def failures() -> list[str]:
        return [line for line in strict.log().splitlines() if "auth failed" in line and remote in line]

    wait_for(lambda: len(failures()) >= 2, 5,
             what=f"two 'auth failed' lines for {remote} (got {failures()})")
    assert len(failures()) == 2
    assert all("user='pw'" in line and "method=password" in line for line in failures())
    wait_for(lambda: "too many auth failures" in strict.log(), 10, what="disconnect logged")
    log = strict.log()
    for password in (*WRONG_PASSWORDS, ARGON_PASSWORD):
        assert password not in log


def test_max_auth_tries_with_openssh_keys(strict: Daemon, keys: dict[str, Key]) -> None:
    """OpenSSH offering three unauthorized keys: two are judged, then the connection is cut."""
    opts = [o for o in ssh_opts(strict, None, port_flag="-p")]
    cmd = ["ssh", *opts, "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no"]
    for name in ("stranger", "acme2", "globex"):
        cmd += ["-i", str(keys[name].path)]
    r = subprocess.run([*cmd, "pw@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    wait_for(lambda: "too many auth failures" in strict.log(), 10, what="disconnect logged")
    failed = [line for line in strict.log().splitlines() if "auth failed" in line]
    assert len(failed) == 2, failed
    assert all("method=publickey" in line and "remote=127.0.0.1:" in line for line in failed)


def test_paramiko_can_retry_auth_on_same_connection(world: World) -> None:
    """A wrong key, then the right one, on one paramiko transport (what SSHClient does with several
    keys or an agent): the second attempt logs in, as it does against OpenSSH sshd."""
    sock = socket.create_connection(("127.0.0.1", world.daemon.port), timeout=10)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_publickey("acme-erp", paramiko.Ed25519Key.from_private_key_file(str(world.keys["stranger"].path)))
        t.auth_publickey("acme-erp", paramiko.Ed25519Key.from_private_key_file(str(world.keys["acme"].path)))
        assert t.is_authenticated()
        sftp = paramiko.SFTPClient.from_transport(t)
        assert sftp is not None and sftp.normalize(".") == "/"
    finally:
        t.close()


def test_max_auth_tries_counts_per_connection(strict: Daemon) -> None:
    """After a connection is cut for failures, a fresh one still logs in with the right password."""
    sock = socket.create_connection(("127.0.0.1", strict.port), timeout=10)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=10)
        for pw in WRONG_PASSWORDS[:2]:
            with pytest.raises(paramiko.SSHException):
                t.auth_password("pw", pw)
        wait_for(lambda: not t.is_active(), 10, what="server to close the transport")
    finally:
        t.close()
    with paramiko_session(strict, "pw", password=ARGON_PASSWORD) as c:
        assert c.normalize(".") == "/"


# -- refused channel types ----------------------------------------------------------------------


def test_exec_refused(world: World) -> None:
    """``ssh host echo hi`` fails and runs nothing."""
    r = ssh(world.daemon, world.keys["acme"], "acme-erp", "--", "echo", "hi-from-exec")
    assert r.returncode != 0
    assert "hi-from-exec" not in r.stdout


def test_shell_refused(world: World) -> None:
    """An interactive shell (with or without a pty) is refused."""
    for flag in ("-T", "-tt"):
        r = ssh(world.daemon, world.keys["acme"], "acme-erp", flag, input="echo hi-from-shell\nexit\n")
        assert r.returncode != 0, (flag, r.stdout, r.stderr)
        assert "hi-from-shell" not in r.stdout.replace("echo hi-from-shell", "")


def test_other_subsystem_refused(world: World) -> None:
    """Only the ``sftp`` subsystem exists."""
    r = ssh(world.daemon, world.keys["acme"], "acme-erp", "-s", "--", "netconf")
    assert r.returncode != 0


def test_stdio_forwarding_refused(world: World) -> None:
    """``ssh -W`` (a direct-tcpip channel) is refused."""
    r = ssh(world.daemon, world.keys["acme"], "acme-erp", "-W", f"127.0.0.1:{world.daemon.port}", timeout=30)
    assert r.returncode != 0
    assert "SSH-2.0" not in r.stdout


def test_remote_forwarding_refused(world: World) -> None:
    """``ssh -R`` is refused (ExitOnForwardFailure makes the refusal the exit reason)."""
    r = ssh(world.daemon, world.keys["acme"], "acme-erp", "-N", "-o", "ExitOnForwardFailure=yes",
            "-R", "0:127.0.0.1:9", timeout=30)
    assert r.returncode != 0
    assert "forwarding failed" in r.stderr.lower(), r.stderr


def test_local_forwarding_channel_refused(world: World) -> None:
    """paramiko ``direct-tcpip`` (what ``ssh -L`` opens) gets ChannelException; nothing connects."""
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen(1)
        target.setblocking(False)
        with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as c:
            t = c.get_channel().get_transport()
            with pytest.raises(paramiko.ChannelException):
                t.open_channel("direct-tcpip", dest_addr=target.getsockname(), src_addr=("127.0.0.1", 0),
                               timeout=10)
            with pytest.raises(paramiko.SSHException):
                t.request_port_forward("127.0.0.1", 0)
            assert c.normalize(".") == "/"  # the SFTP session is unaffected
        with pytest.raises(BlockingIOError):
            target.accept()


# -- algorithms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opts, reason", [
    (("-c", "aes128-cbc"), "no matching cipher"),
    (("-c", "aes256-cbc"), "no matching cipher"),
    (("-c", "aes128-ctr", "-o", "MACs=hmac-sha1"), "no matching MAC"),
    (("-c", "aes128-ctr", "-o", "MACs=hmac-sha1-etm@openssh.com"), "no matching MAC"),
    (("-c", "aes128-ctr", "-o", "MACs=umac-64-etm@openssh.com"), "no matching MAC"),
    (("-o", "KexAlgorithms=diffie-hellman-group14-sha1"), "no matching key exchange"),
    (("-o", "KexAlgorithms=diffie-hellman-group1-sha1"), "no matching key exchange"),
    (("-o", "KexAlgorithms=diffie-hellman-group-exchange-sha1"), "no matching key exchange"),
    (("-o", "HostKeyAlgorithms=ssh-rsa"), "no matching host key"),
], ids=["aes128-cbc", "aes256-cbc", "hmac-sha1", "hmac-sha1-etm", "umac-64", "dh-group14-sha1",
        "dh-group1-sha1", "dh-gex-sha1", "hostkey-ssh-rsa"])
def test_legacy_algorithms_refused(world: World, opts: tuple[str, ...], reason: str) -> None:
    """SHA-1, CBC and umac offers fail at negotiation; the server's own offer has none of them."""
    r = negotiate(world.daemon, world.keys["acme"], "acme-erp", *opts)
    assert r.returncode != 0
    assert "Remote working directory" not in r.stdout
    assert reason.lower() in r.stderr.lower(), r.stderr
    offer = r.stderr.split("Their offer:", 1)[1].splitlines()[0].strip().lower()
    for weak in ("cbc", "sha1", "umac", "ssh-rsa,", "group1-", "3des", "arcfour"):
        assert weak not in offer + ",", f"server offers {weak}: {offer}"


def test_ssh_rsa_user_signature_refused(world: World) -> None:
    """An RSA user key is accepted with rsa-sha2-*, refused when the client can only sign ssh-rsa."""
    assert_connected(connects(world.daemon, world.rsa, "rsa-user"))
    assert_connected(connects(world.daemon, world.rsa, "rsa-user", "-o", "PubkeyAcceptedAlgorithms=rsa-sha2-256"))
    assert_auth_refused(connects(world.daemon, world.rsa, "rsa-user", "-o", "PubkeyAcceptedAlgorithms=ssh-rsa"))


@pytest.mark.parametrize("opts", [
    ("-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com"),
    ("-c", "aes256-ctr", "-o", "MACs=hmac-sha2-512"),
    ("-c", "chacha20-poly1305@openssh.com"),
    ("-c", "aes256-gcm@openssh.com", "-o", "KexAlgorithms=curve25519-sha256"),
    ("-o", "KexAlgorithms=diffie-hellman-group14-sha256"),
    ("-o", "KexAlgorithms=ecdh-sha2-nistp256"),
], ids=["aes128-ctr+etm", "aes256-ctr+sha2-512", "chacha20", "aes256-gcm+x25519", "dh14-sha256", "ecdh-p256"])
def test_modern_algorithms_accepted(world: World, opts: tuple[str, ...]) -> None:
    """The modern set (and aes-ctr + hmac-sha2 for legacy clients) connects."""
    assert_connected(connects(world.daemon, world.keys["acme"], "acme-erp", *opts))


def test_paramiko_negotiates_no_sha1(world: World) -> None:
    """paramiko with its default offer ends up with a SHA-2 MAC or AEAD cipher and no SHA-1 kex."""
    with paramiko_session(world.daemon, "acme-erp", world.keys["acme"]) as c:
        t = c.get_channel().get_transport()
        assert "cbc" not in t.remote_cipher and "cbc" not in t.local_cipher
        assert t.remote_mac != "hmac-sha1" and t.local_mac != "hmac-sha1"
        assert "sha1" not in (t.kex_engine.__class__.__name__.lower() if t.kex_engine else "")


def test_cipher_override_in_config(tmp_path: Path, keys: dict[str, Key]) -> None:
    """``gateway.algorithms.ciphers: [aes256-ctr]`` makes every other cipher fail."""
    tenants = {"acme": {"users": [{"name": "u", "authorized_keys": [keys["acme"].pub]}]}}
    cfg = base_config(tmp_path, free_port(), tenants, algorithms={"ciphers": ["aes256-ctr"]})
    with run_daemon(tmp_path, cfg) as d:
        for cipher in ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"):
            r = negotiate(d, keys["acme"], "u", "-c", cipher)
            assert r.returncode != 0
            assert "no matching cipher" in r.stderr.lower(), r.stderr
            assert "Their offer: aes256-ctr\n" in r.stderr, r.stderr
        assert_connected(connects(d, keys["acme"], "u", "-c", "aes256-ctr"))
        assert_connected(connects(d, keys["acme"], "u"))
