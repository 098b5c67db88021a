"""The SSH server: host keys, algorithms, authentication, per-connection limits."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import asyncssh

from relayd.config import Config, UserConfig
from relayd import sshcompat as compat
from relayd.gateway.context import GatewayContext, Identity
from relayd.gateway.handler import SFTPOnlySession
from relayd.gateway.sftp import TenantSFTPServer

__all__ = ["load_host_keys", "start_listeners", "GatewayConnection", "verify_password"]

log = logging.getLogger("relayd.gateway.auth")
compat.install()

# SSH channel sizes. A max packet of 32 KiB (asyncssh's default) splits every 32 KiB SFTP WRITE
# from OpenSSH's sftp into two SSH packets; a larger one lets clients batch requests, which
# halves (or better) the per-packet work. Memory stays bounded by the window per channel.
MAX_PKTSIZE = 256 * 1024
WINDOW = 4 * 1024 * 1024

_conn_ids = itertools.count(1)


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """A real hash of a random secret: unknown users cost the same time as known ones."""
    import argon2

    return argon2.PasswordHasher().hash(secrets.token_hex(16))


def load_host_keys(config: Config) -> list[asyncssh.SSHKey]:
    """Configured host keys, or ``state_dir/ssh_host_ed25519_key`` (generated on first start)."""
    if config.gateway.host_keys:
        keys = [asyncssh.read_private_key(str(p)) for p in config.gateway.host_keys]
    else:
        path = config.node.state_dir / "ssh_host_ed25519_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            key = asyncssh.generate_private_key("ssh-ed25519", comment=f"relayd@{config.node.id}")
            _write_private(path, key.export_private_key())
            Path(str(path) + ".pub").write_bytes(key.export_public_key())
            log.info("generated host key %s", path)
        keys = [asyncssh.read_private_key(str(path))]
    for key in keys:
        log.info("host key %s %s", key.get_algorithm(), key.get_fingerprint("sha256"))
    return keys


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check a password against an argon2 or bcrypt hash (constant-ish time for unknown users)."""
    import argon2
    import bcrypt

    if password_hash is None or not password_hash.startswith(("$2b$", "$2a$", "$2y$")):
        ph = argon2.PasswordHasher()
        try:
            return ph.verify(password_hash or _dummy_hash(), password) and password_hash is not None
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password.encode("utf-8"), password_hash.encode("ascii"))
    except ValueError:
        return False


def _authorized_keys(user: UserConfig, cert_authorities: tuple[str, ...]) -> asyncssh.SSHAuthorizedKeys | None:
    lines = list(user.authorized_keys)
    # A certificate is accepted only if one of its principals is the login name, as sshd does
    # with TrustedUserCAKeys (a certificate with no principals is refused).
    lines += [f'cert-authority,principals="{user.name}" {ca.strip()}' for ca in cert_authorities]
    if not lines:
        return None
    return asyncssh.import_authorized_keys("\n".join(lines) + "\n")


class GatewayConnection(asyncssh.SSHServer):
    """Per-connection SSH server callbacks: authentication and session creation."""

    def __init__(self, ctx: GatewayContext):
        self.ctx = ctx
        self.config = ctx.config  # a connection keeps the config it started with (reload-safe)
        self.conn_id = f"c{next(_conn_ids)}"
        self.conn: asyncssh.SSHServerConnection | None = None
        self.remote = "?"
        self.ip = "?"
        self.rejected = False
        self.user: UserConfig | None = None
        self.username = ""
        self.failures = 0
        self.authenticated = False
        self.servers: list[TenantSFTPServer] = []
        self.started = time.monotonic()
        self.auth_method = "publickey"  # what succeeded, for the metrics (password sets it)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.ip = str(peer[0])
        self.remote = f"{peer[0]}:{peer[1]}"
        gw = self.config.gateway
        ctx = self.ctx
        if ctx.startups >= gw.max_startups or ctx.per_ip[self.ip] >= gw.max_connections_per_ip:
            self.rejected = True
            if ctx.metrics is not None:
                ctx.metrics.connections_refused.inc()
            log.warning("refused: connection flood conn=%s remote=%s (unauthenticated=%d, from this address=%d)",
                        self.conn_id, self.remote, ctx.startups, ctx.per_ip[self.ip],
                        extra={"event.action": "connection-refused", "event.category": "network",
                               "event.outcome": "failure", "source.ip": self.ip})
            asyncio.get_running_loop().call_soon(conn.abort)
            return
        ctx.connections[conn] = self
        ctx.startups += 1
        ctx.per_ip[self.ip] += 1
        log.info("connection conn=%s remote=%s", self.conn_id, self.remote)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected or self.conn is None:
            return
        ctx = self.ctx
        ctx.connections.pop(self.conn, None)
        ctx.per_ip[self.ip] -= 1
        if ctx.per_ip[self.ip] <= 0:
            del ctx.per_ip[self.ip]
        if not self.authenticated:
            ctx.startups -= 1
        elif self.user is not None:
            log.info("disconnected conn=%s user=%s remote=%s%s", self.conn_id, self.user.name, self.remote,
                     f" reason={exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        self.username = username
        self.user = self.config.find_user(username)
        if self.user is not None and self.conn is not None:
            tenant = self.config.tenants[self.user.tenant]
            keys = _authorized_keys(self.user, tenant.cert_authorities)
            if keys is not None:
                self.conn.set_authorized_keys(keys)
        return True

    def _failed(self, method: str) -> None:
        self.failures += 1
        if self.ctx.metrics is not None:
            self.ctx.metrics.auth(method, False)
        log.warning("auth failed conn=%s user=%r method=%s remote=%s attempt=%d", self.conn_id,
                    self.username[:64], method, self.remote, self.failures,
                    extra={"event.action": "login", "event.category": "authentication", "event.outcome": "failure",
                           "user.name": self.username[:64], "source.ip": self.ip, "relayd.auth_method": method})
        if self.failures >= self.config.gateway.max_auth_tries and self.conn is not None:
            log.warning("too many auth failures conn=%s remote=%s: disconnecting", self.conn_id, self.remote)
            conn = self.conn
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures")

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Reached only when no authorized key matched.
        self._failed("publickey")
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._failed("publickey-cert")
        return False

    def password_auth_supported(self) -> bool:
        return any(u.password_hash for t in self.config.tenants.values() for u in t.users)

    async def validate_password(self, username: str, password: str) -> bool:
        pw_hash = self.user.password_hash if self.user is not None else None
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, pw_hash, password)
        if not ok:
            self._failed("password")
        else:
            self.auth_method = "password"
        return ok

    def auth_completed(self) -> None:
        self.authenticated = True
        self.ctx.startups -= 1
        assert self.user is not None
        if self.ctx.metrics is not None:
            self.ctx.metrics.auth(self.auth_method, True)
        log.info("login conn=%s user=%s tenant=%s remote=%s", self.conn_id, self.user.name, self.user.tenant,
                 self.remote, extra={"event.action": "login", "event.category": "authentication",
                                     "event.outcome": "success", "user.name": self.user.name,
                                     "source.ip": self.ip, "relayd.tenant": self.user.tenant,
                                     "relayd.auth_method": self.auth_method})

    def session_requested(self) -> Any:
        user = self.user
        if user is None or not self.authenticated:
            return False
        if self.ctx.draining:
            return False
        limit = self.config.gateway.max_sessions_per_user
        if self.ctx.sessions[user.name] >= limit:
            log.warning("refused: session limit %d reached conn=%s user=%s", limit, self.conn_id, user.name)
            return False
        self.ctx.sessions[user.name] += 1
        ident = Identity(user=user, tenant=self.config.tenants[user.tenant], remote=self.remote,
                         conn_id=self.conn_id)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.ctx.sessions[user.name] -= 1

        def make_server(chan: asyncssh.SSHServerChannel) -> TenantSFTPServer:
            server = TenantSFTPServer(chan, self.ctx, ident)
            self.servers = [s for s in self.servers if not s.exited] + [server]
            return server

        return SFTPOnlySession(make_server,
                               self.config.gateway.max_handles_per_session, self.conn_id, release, user=user.name,
                               peer="peer" in user.permissions)

    def idle_for(self, now: float) -> float:
        """Seconds since the last SFTP request (0 while an upload is open)."""
        if any(s.handles for s in self.servers):
            return 0.0
        return now - max([self.started] + [s.last_activity for s in self.servers])

    # Forwarding of any kind is refused.
    def connection_requested(self, *args: Any) -> bool:
        log.warning("refused: port forwarding conn=%s", self.conn_id)
        return False

    def server_requested(self, *args: Any) -> bool:
        log.warning("refused: remote port forwarding conn=%s", self.conn_id)
        return False

    def unix_connection_requested(self, *args: Any) -> bool:
        return False

    def unix_server_requested(self, *args: Any) -> bool:
        return False


async def start_listeners(ctx: GatewayContext, host_keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHAcceptor]:
    """Bind every ``gateway.listen`` address; return the acceptors."""
    gw = ctx.config.gateway
    algs = gw.algorithms
    acceptors = []
    for host, port in gw.listen:
        acceptor = await asyncssh.create_server(
            lambda: GatewayConnection(ctx), host, port,
            server_host_keys=host_keys,
            kex_algs=list(algs.kex), encryption_algs=list(algs.ciphers), mac_algs=list(algs.macs),
            signature_algs=list(algs.signatures), compression_algs=list(algs.compression),
            login_timeout=gw.login_timeout, keepalive_interval=gw.keepalive_interval or None,
            keepalive_count_max=3, allow_pty=False, agent_forwarding=False, x11_forwarding=False,
            server_version="relayd", reuse_address=True, max_pktsize=MAX_PKTSIZE, window=WINDOW,
        )
        acceptors.append(acceptor)
        log.info("listening on %s:%d", host, port)
    return acceptors
