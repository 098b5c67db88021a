"""Configuration: schema, loading and validation.

YAML is read once and turned into frozen dataclasses. Every problem is reported with the
dotted key path it concerns (``tenants.acme.users[0].authorized_keys``); all problems are
collected, not just the first. Unknown keys are errors so typos never pass silently.

This module imports nothing else of relayd (see DESIGN.md).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

__all__ = [
    "ConfigError", "Config", "NodeConfig", "GatewayConfig", "AlgorithmsConfig",
    "TenantConfig", "UserConfig", "QuotaConfig", "RouteConfig", "DestinationConfig",
    "load_config", "parse_config", "parse_size", "parse_duration", "PERMISSIONS",
    "DEFAULT_PERMISSIONS", "DEFAULT_ALGORITHMS",
]

PERMISSIONS = frozenset({"list", "download", "upload", "overwrite", "delete", "rename", "mkdir"})
DEFAULT_PERMISSIONS = frozenset({"upload", "list", "mkdir"})
DEFAULT_TEMP_PATTERNS = ("*.tmp", "*.part", "*.filepart")

# Modern algorithms only, in the spirit of OpenSSH's current defaults: no SHA-1, no CBC,
# no ssh-rsa (SHA-1) signatures, no umac. aes-ctr + hmac-sha2 stay for legacy clients
# (libssh2 in Debian 12 has no AEAD ciphers). Strict kex (Terrapin) is negotiated by asyncssh.
DEFAULT_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "kex": (
        "mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
        "diffie-hellman-group-exchange-sha256", "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256",
    ),
    "ciphers": (
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
        "aes128-ctr", "aes192-ctr", "aes256-ctr",
    ),
    "macs": (
        "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
        "hmac-sha2-256", "hmac-sha2-512",
    ),
    "signatures": (
        "ssh-ed25519", "sk-ssh-ed25519@openssh.com",
        "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ecdsa-sha2-nistp256@openssh.com", "rsa-sha2-512", "rsa-sha2-256",
    ),
    "compression": ("none",),
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
    "p": 1000**5, "pb": 1000**5, "pib": 1024**5, "pi": 1024**5,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one ``key.path: problem`` line each."""

    exit_code = 2

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def parse_size(value: Any) -> int:
    """Parse ``10GiB``, ``5GB``, ``512k`` or a plain integer into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _SIZE_UNITS:
                return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size such as 10GiB, got {value!r}")


def parse_duration(value: Any) -> float:
    """Parse ``30s``, ``5m``, ``7d`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
    raise ValueError(f"expected a duration such as 30s, 5m or 7d, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Typed, frozen config objects


@dataclass(frozen=True)
class NodeConfig:
    """This gateway: its id and where it keeps state and spooled data."""

    id: str
    state_dir: Path
    spool_dir: Path


@dataclass(frozen=True)
class AlgorithmsConfig:
    """SSH algorithm lists offered by the server, in preference order."""

    kex: tuple[str, ...] = DEFAULT_ALGORITHMS["kex"]
    ciphers: tuple[str, ...] = DEFAULT_ALGORITHMS["ciphers"]
    macs: tuple[str, ...] = DEFAULT_ALGORITHMS["macs"]
    signatures: tuple[str, ...] = DEFAULT_ALGORITHMS["signatures"]
    compression: tuple[str, ...] = DEFAULT_ALGORITHMS["compression"]


@dataclass(frozen=True)
class GatewayConfig:
    """The SSH/SFTP front door."""

    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 2222),)
    host_keys: tuple[Path, ...] = ()
    login_timeout: float = 30.0
    max_auth_tries: int = 6
    max_sessions_per_user: int = 16
    max_handles_per_session: int = 64
    idle_timeout: float = 900.0
    keepalive_interval: float = 30.0
    drain_timeout: float = 60.0
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)


@dataclass(frozen=True)
class QuotaConfig:
    """Tenant quota; ``None`` means unlimited."""

    bytes: int | None = None
    files: int | None = None


@dataclass(frozen=True)
class UserConfig:
    """One login. ``authorized_keys`` holds the parsed key lines (file contents included)."""

    name: str
    tenant: str
    authorized_keys: tuple[str, ...] = ()
    authorized_keys_file: Path | None = None
    password_hash: str | None = None
    permissions: frozenset[str] = DEFAULT_PERMISSIONS


@dataclass(frozen=True)
class RouteConfig:
    """Files whose path (inside the tenant root) matches ``match`` go to ``to``."""

    match: str
    to: tuple[str, ...]


@dataclass(frozen=True)
class TenantConfig:
    """A tenant: its users, quota, limits, commit mode and routes."""

    name: str
    users: tuple[UserConfig, ...] = ()
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    max_file_size: int | None = None
    commit: str = "close"
    temp_patterns: tuple[str, ...] = DEFAULT_TEMP_PATTERNS
    cert_authorities: tuple[str, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    retention: float = 7 * 86400.0

    def is_temp_name(self, name: str) -> bool:
        """True if a file name (last path component) matches one of ``temp_patterns``."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.temp_patterns)


@dataclass(frozen=True)
class DestinationConfig:
    """A delivery target. ``options`` holds the type-specific keys, validated per type."""

    name: str
    type: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    node: NodeConfig
    gateway: GatewayConfig
    tenants: Mapping[str, TenantConfig]
    destinations: Mapping[str, DestinationConfig]
    source: Path | None = None

    def find_user(self, username: str) -> UserConfig | None:
        """The user with this login name, or None."""
        for tenant in self.tenants.values():
            for user in tenant.users:
                if user.name == username:
                    return user
        return None


# ---------------------------------------------------------------------------------------------
# Validation

_Node = Any


class _Checker:
    """Collects errors with key paths while walking the raw YAML tree."""

    def __init__(self, base_dir: Path):
        self.errors: list[str] = []
        self.base_dir = base_dir

    def err(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def mapping(self, path: str, value: _Node, allowed: set[str],
                required: tuple[str, ...] = ()) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {_kind(value)}")
            return {}
        for key in value:
            if not isinstance(key, str):
                self.err(path, f"keys must be strings, got {key!r}")
            elif key not in allowed:
                hint = _closest(key, allowed)
                self.err(_join(path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))
        for key in required:
            if key not in value or value[key] is None:
                self.err(_join(path, key), "is required")
        return value

    def convert(self, path: str, value: _Node, fn: Callable[[Any], Any], default: Any) -> Any:
        if value is None:
            return default
        try:
            return fn(value)
        except (ValueError, TypeError) as exc:
            self.err(path, str(exc))
            return default

    def string(self, path: str, value: _Node, default: str | None = None) -> Any:
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            self.err(path, f"expected a non-empty string, got {_kind(value)}")
            return default
        return value

    def integer(self, path: str, value: _Node, default: int, minimum: int = 0) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"expected an integer, got {_kind(value)}")
            return default
        if value < minimum:
            self.err(path, f"must be at least {minimum}")
            return default
        return value

    def str_list(self, path: str, value: _Node) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.err(path, f"expected a list of strings, got {_kind(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.err(f"{path}[{i}]", f"expected a non-empty string, got {_kind(item)}")
            else:
                out.append(item)
        return tuple(out)

    def path(self, path: str, value: _Node, default: Path | None = None) -> Any:
        s = self.string(path, value)
        if s is None:
            return default
        p = Path(s).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {value!r}", bool: f"the boolean {value}",
            int: f"the number {value}", float: f"the number {value}"}.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None


def _parse_listen(ck: _Checker, path: str, value: _Node) -> tuple[tuple[str, int], ...]:
    items = ck.str_list(path, value) if value is not None else ("0.0.0.0:2222",)
    out = []
    for i, item in enumerate(items):
        host, sep, port_s = item.rpartition(":")
        host = host.strip("[]")
        try:
            if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
                raise ValueError
            if host not in ("", "localhost", "*"):
                ipaddress.ip_address(host)
        except ValueError:
            ck.err(f"{path}[{i}]", f"expected HOST:PORT with an IP address and a port 1-65535, got {item!r}")
            continue
        out.append((host if host not in ("", "*") else "0.0.0.0", int(port_s)))
    if value is not None and not items:
        ck.err(path, "needs at least one HOST:PORT")
    return tuple(out)


def _parse_algorithms(ck: _Checker, path: str, raw: _Node) -> AlgorithmsConfig:
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_public_key_algs

    supported = {
        "kex": {a.decode() for a in get_kex_algs()},
        "ciphers": {a.decode() for a in get_encryption_algs()},
        "macs": {a.decode() for a in get_mac_algs()},
        "signatures": {a.decode() for a in get_public_key_algs()},
        "compression": {"none", "zlib@openssh.com", "zlib"},
    }
    raw = ck.mapping(path, raw, set(supported))
    values: dict[str, tuple[str, ...]] = {}
    for key, known in supported.items():
        if key not in raw:
            continue
        names = ck.str_list(_join(path, key), raw[key])
        if not names:
            ck.err(_join(path, key), "needs at least one algorithm")
            continue
        for i, name in enumerate(names):
            if name not in known:
                ck.err(f"{path}.{key}[{i}]", f"unsupported algorithm {name!r}")
        values[key] = names
    return AlgorithmsConfig(**values)


def _parse_node(ck: _Checker, raw: _Node) -> NodeConfig:
    raw = ck.mapping("node", raw, {"id", "state_dir", "spool_dir"}, required=("id",))
    node_id = ck.string("node.id", raw.get("id"), "relayd")
    if node_id and not _NAME_RE.match(node_id):
        ck.err("node.id", "use letters, digits, '.', '_' or '-' (max 64)")
    return NodeConfig(
        id=node_id or "relayd",
        state_dir=ck.path("node.state_dir", raw.get("state_dir"), Path("/var/lib/relayd")),
        spool_dir=ck.path("node.spool_dir", raw.get("spool_dir"), Path("/var/spool/relayd")),
    )


def _parse_gateway(ck: _Checker, raw: _Node) -> GatewayConfig:
    keys = {"listen", "host_keys", "login_timeout", "max_auth_tries", "max_sessions_per_user",
            "max_handles_per_session", "idle_timeout", "keepalive_interval", "drain_timeout",
            "algorithms"}
    raw = ck.mapping("gateway", raw, keys)
    d = GatewayConfig()
    host_keys = []
    for i, item in enumerate(ck.str_list("gateway.host_keys", raw.get("host_keys"))):
        p = ck.path(f"gateway.host_keys[{i}]", item)
        if p is not None and not p.is_file():
            ck.err(f"gateway.host_keys[{i}]", f"file not found: {item}")
        host_keys.append(p)
    return GatewayConfig(
        listen=_parse_listen(ck, "gateway.listen", raw.get("listen")),
        host_keys=tuple(host_keys),
        login_timeout=ck.convert("gateway.login_timeout", raw.get("login_timeout"), parse_duration,
                                 d.login_timeout),
        max_auth_tries=ck.integer("gateway.max_auth_tries", raw.get("max_auth_tries"), d.max_auth_tries, 1),
        max_sessions_per_user=ck.integer("gateway.max_sessions_per_user", raw.get("max_sessions_per_user"),
                                         d.max_sessions_per_user, 1),
        max_handles_per_session=ck.integer("gateway.max_handles_per_session",
                                           raw.get("max_handles_per_session"), d.max_handles_per_session, 1),
        idle_timeout=ck.convert("gateway.idle_timeout", raw.get("idle_timeout"), parse_duration, d.idle_timeout),
        keepalive_interval=ck.convert("gateway.keepalive_interval", raw.get("keepalive_interval"),
                                      parse_duration, d.keepalive_interval),
        drain_timeout=ck.convert("gateway.drain_timeout", raw.get("drain_timeout"), parse_duration,
                                 d.drain_timeout),
        algorithms=_parse_algorithms(ck, "gateway.algorithms", raw.get("algorithms")),
    )


def _check_public_key(ck: _Checker, path: str, line: str, *, ca: bool = False) -> None:
    import asyncssh

    try:
        asyncssh.import_authorized_keys(line)
    except (ValueError, asyncssh.KeyImportError) as exc:
        ck.err(path, f"not a valid OpenSSH public key line ({exc})")
        return
    if ca and line.lstrip().startswith(("cert-authority", "from=", "principals=")):
        ck.err(path, "give the bare CA public key; relayd adds the options itself")


def _parse_user(ck: _Checker, path: str, raw: _Node, tenant: str) -> UserConfig | None:
    raw = ck.mapping(path, raw, {"name", "authorized_keys", "authorized_keys_file", "password_hash",
                                 "password", "permissions"}, required=("name",))
    name = ck.string(_join(path, "name"), raw.get("name"))
    if name is not None and not _NAME_RE.match(name):
        ck.err(_join(path, "name"), "use letters, digits, '.', '_' or '-' (max 64)")
    if "password" in raw:
        ck.err(_join(path, "password"), "plaintext passwords are refused; use password_hash "
               "(make one with: relayd hash-password)")
    keys = list(ck.str_list(_join(path, "authorized_keys"), raw.get("authorized_keys")))
    for i, line in enumerate(keys):
        _check_public_key(ck, f"{path}.authorized_keys[{i}]", line)
    keys_file = ck.path(_join(path, "authorized_keys_file"), raw.get("authorized_keys_file"))
    if keys_file is not None:
        try:
            text = keys_file.read_text()
        except OSError as exc:
            ck.err(_join(path, "authorized_keys_file"), f"cannot read {keys_file}: {exc.strerror}")
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    before = len(ck.errors)
                    _check_public_key(ck, _join(path, "authorized_keys_file"), line)
                    if len(ck.errors) > before:
                        ck.errors[-1] = ck.errors[-1].replace(": not a valid", f": line {lineno}: not a valid", 1)
                    keys.append(line)
    pw_hash = ck.string(_join(path, "password_hash"), raw.get("password_hash"))
    if pw_hash is not None and not pw_hash.startswith(("$argon2id$", "$argon2i$", "$2b$", "$2a$", "$2y$")):
        ck.err(_join(path, "password_hash"), "must be an argon2id or bcrypt hash ($argon2id$... or $2b$...); "
               "plaintext is refused")
    perms_raw = raw.get("permissions")
    perms = DEFAULT_PERMISSIONS
    if perms_raw is not None:
        plist = ck.str_list(_join(path, "permissions"), perms_raw)
        for i, p in enumerate(plist):
            if p not in PERMISSIONS:
                ck.err(f"{path}.permissions[{i}]", f"unknown permission {p!r} (known: {', '.join(sorted(PERMISSIONS))})")
        perms = frozenset(p for p in plist if p in PERMISSIONS)
    if name is not None and not keys and pw_hash is None:
        ck.err(path, "user has no authorized_keys, authorized_keys_file or password_hash; it could never log in")
    if name is None:
        return None
    return UserConfig(name=name, tenant=tenant, authorized_keys=tuple(keys), authorized_keys_file=keys_file,
                      password_hash=pw_hash, permissions=perms)


def _parse_tenant(ck: _Checker, name: str, raw: _Node, destinations: Mapping[str, Any]) -> TenantConfig:
    path = f"tenants.{name}"
    if not _NAME_RE.match(name):
        ck.err(path, "tenant names use letters, digits, '.', '_' or '-' (max 64)")
    raw = ck.mapping(path, raw, {"users", "quota", "max_file_size", "commit", "temp_patterns",
                                 "cert_authorities", "routes", "retention"})
    quota_raw = ck.mapping(_join(path, "quota"), raw.get("quota"), {"bytes", "files"})
    quota = QuotaConfig(
        bytes=ck.convert(f"{path}.quota.bytes", quota_raw.get("bytes"), parse_size, None),
        files=ck.integer(f"{path}.quota.files", quota_raw.get("files"), None, 0)  # type: ignore[arg-type]
        if quota_raw.get("files") is not None else None,
    )
    commit = raw.get("commit", "close")
    if commit not in ("close", "rename"):
        ck.err(_join(path, "commit"), f"must be 'close' or 'rename', got {commit!r}")
        commit = "close"
    temp_patterns = ck.str_list(_join(path, "temp_patterns"), raw.get("temp_patterns")) \
        if "temp_patterns" in raw else DEFAULT_TEMP_PATTERNS
    cas = ck.str_list(_join(path, "cert_authorities"), raw.get("cert_authorities"))
    for i, line in enumerate(cas):
        _check_public_key(ck, f"{path}.cert_authorities[{i}]", line, ca=True)
    users_raw = raw.get("users")
    users: list[UserConfig] = []
    if users_raw is not None and not isinstance(users_raw, list):
        ck.err(_join(path, "users"), f"expected a list, got {_kind(users_raw)}")
    else:
        for i, u in enumerate(users_raw or []):
            user = _parse_user(ck, f"{path}.users[{i}]", u, name)
            if user is not None:
                users.append(user)
    routes: list[RouteConfig] = []
    routes_raw = raw.get("routes")
    if routes_raw is not None and not isinstance(routes_raw, list):
        ck.err(_join(path, "routes"), f"expected a list, got {_kind(routes_raw)}")
    else:
        for i, r in enumerate(routes_raw or []):
            rpath = f"{path}.routes[{i}]"
            r = ck.mapping(rpath, r, {"match", "to"}, required=("match", "to"))
            match = ck.string(_join(rpath, "match"), r.get("match"), "**")
            to = ck.str_list(_join(rpath, "to"), r.get("to"))
            for j, dest in enumerate(to):
                if dest not in destinations:
                    ck.err(f"{rpath}.to[{j}]", f"unknown destination {dest!r}"
                           + (f" (defined: {', '.join(sorted(destinations))})" if destinations else
                              " (no destinations are defined)"))
            routes.append(RouteConfig(match=match, to=to))
    return TenantConfig(
        name=name, users=tuple(users), quota=quota,
        max_file_size=ck.convert(_join(path, "max_file_size"), raw.get("max_file_size"), parse_size, None),
        commit=commit, temp_patterns=temp_patterns, cert_authorities=cas, routes=tuple(routes),
        retention=ck.convert(_join(path, "retention"), raw.get("retention"), parse_duration, 7 * 86400.0),
    )


_DEST_KEYS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "local": ({"type", "path", "concurrency", "on_conflict", "sidecar", "hmac_key_file", "verify"}, ("path",)),
    "sftp": ({"type", "host", "port", "user", "identity", "known_hosts", "path", "concurrency", "verify",
              "on_conflict", "sidecar", "hmac_key_file", "max_attempts", "max_age", "connect_timeout",
              "idle_timeout", "block_size", "requests"}, ("host", "user", "identity", "known_hosts", "path")),
    "relayd": ({"type", "host", "port", "user", "identity", "known_hosts", "path", "concurrency",
                "max_attempts", "max_age", "connect_timeout", "idle_timeout"},
               ("host", "user", "identity", "known_hosts", "path")),
}


def _parse_destination(ck: _Checker, name: str, raw: _Node) -> DestinationConfig | None:
    path = f"destinations.{name}"
    if not isinstance(raw, dict):
        ck.err(path, f"expected a mapping, got {_kind(raw)}")
        return None
    dtype = raw.get("type")
    if dtype not in _DEST_KEYS:
        ck.err(_join(path, "type"), f"must be one of {', '.join(sorted(_DEST_KEYS))}, got {dtype!r}")
        return None
    allowed, required = _DEST_KEYS[dtype]
    raw = ck.mapping(path, raw, allowed, required=required)
    return DestinationConfig(name=name, type=dtype, options={k: v for k, v in raw.items() if k != "type"})


def parse_config(data: Any, base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Validate a raw YAML tree and build the frozen :class:`Config`; raise :class:`ConfigError`."""
    ck = _Checker(base_dir or Path.cwd())
    top = ck.mapping("", data, {"node", "gateway", "tenants", "destinations"}, required=("node",))
    node = _parse_node(ck, top.get("node"))
    gateway = _parse_gateway(ck, top.get("gateway"))
    dest_raw = ck.mapping("destinations", top.get("destinations"), set(top.get("destinations") or {}))
    destinations: dict[str, DestinationConfig] = {}
    for dname, draw in dest_raw.items():
        dest = _parse_destination(ck, str(dname), draw)
        if dest is not None:
            destinations[str(dname)] = dest
    tenants_raw = top.get("tenants")
    tenants: dict[str, TenantConfig] = {}
    if tenants_raw is not None and not isinstance(tenants_raw, dict):
        ck.err("tenants", f"expected a mapping, got {_kind(tenants_raw)}")
    else:
        for tname, traw in (tenants_raw or {}).items():
            tenants[str(tname)] = _parse_tenant(ck, str(tname), traw, dest_raw)
    seen: dict[str, str] = {}
    for tname, tenant in tenants.items():
        for i, user in enumerate(tenant.users):
            if user.name in seen:
                ck.err(f"tenants.{tname}.users[{i}].name",
                       f"user {user.name!r} is already defined in tenant {seen[user.name]!r}; login names are global")
            else:
                seen[user.name] = tname
    if ck.errors:
        raise ConfigError(ck.errors)
    return Config(node=node, gateway=gateway, tenants=tenants, destinations=destinations, source=source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent overwrite hides mistakes)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Relative paths in it are relative to its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: config is not UTF-8 text"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{p}: {where}invalid YAML: {problem}"]) from None
    if data is None:
        raise ConfigError([f"{p}: config is empty"])
    return parse_config(data, base_dir=p.resolve().parent, source=p.resolve())
