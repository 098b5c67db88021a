"""Configuration: schema, loading and validation.

YAML is read once and turned into frozen dataclasses. Every problem is reported with the
dotted key path it concerns (``tenants.acme.users[0].authorized_keys``); all problems are
collected, not just the first. Unknown keys are errors so typos never pass silently.

The schema lives in one place, :data:`KEYS` (and its one-line rendering :data:`SCHEMA`): the
validator takes every allowed and required key set from it, so the documentation, the example
config and the code cannot drift apart (``tests/unit/test_docs.py`` checks the first two).

This module imports nothing else of relayd (see DESIGN.md).
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

__all__ = [
    "ConfigError", "Config", "NodeConfig", "GatewayConfig", "AlgorithmsConfig",
    "TenantConfig", "UserConfig", "QuotaConfig", "RouteConfig", "DestinationConfig",
    "load_config", "parse_config", "parse_size", "parse_duration", "PERMISSIONS",
    "DEFAULT_PERMISSIONS", "DEFAULT_ALGORITHMS", "DEFAULT_TEMP_PATTERNS", "DESTINATION_TYPES",
    "KeySpec", "KEYS", "SCHEMA", "REQUIRED", "glob_to_regex",
]

PERMISSIONS = frozenset({"list", "download", "upload", "overwrite", "delete", "rename", "mkdir"})
DEFAULT_PERMISSIONS = frozenset({"upload", "list", "mkdir"})
DEFAULT_TEMP_PATTERNS = ("*.tmp", "*.part", "*.filepart")
COMMIT_MODES = ("close", "rename")
DESTINATION_TYPES = ("local", "sftp", "relayd")

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

# ---------------------------------------------------------------------------------------------
# The schema registry


class _Required:
    """Marker for a key without a default (it must be given)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class KeySpec:
    """One config key: its type (as written in YAML), default and meaning.

    ``default`` is the YAML-level value used when the key is left out (``None``: no limit /
    not set; :data:`REQUIRED`: must be given). ``types`` restricts a ``destinations.<name>.*``
    key to some destination types; ``required_for`` makes it required for some of them.
    """

    type: str
    default: Any
    description: str
    types: tuple[str, ...] = ()
    required_for: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """True if the key must always be present."""
        return self.default is REQUIRED

    def summary(self) -> str:
        """One line: ``type; default ...; description``."""
        if self.required:
            default = "required"
        elif self.required_for:
            default = f"required for type {', '.join(self.required_for)}"
        elif self.default is None:
            default = "default: not set"
        else:
            default = f"default: {_yaml_inline(self.default)}"
        where = f" (type {', '.join(self.types)} only)" if self.types else ""
        return f"{self.type}; {default}. {self.description}{where}"


def _yaml_inline(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_K = KeySpec
_REMOTE = ("sftp", "relayd")

#: Every key, by dotted path. ``<name>`` stands for a tenant or destination name, ``[]`` for
#: any list item. The validator's allowed/required key sets come from here.
KEYS: Mapping[str, KeySpec] = MappingProxyType({
    "node": _K("mapping", REQUIRED, "This gateway: its id and where it keeps state and spooled data."),
    "node.id": _K("name", REQUIRED, "Gateway id (letters, digits, '.', '_', '-'; max 64); written into "
                  "every manifest."),
    "node.state_dir": _K("path", "/var/lib/relayd", "Journal (journal.db) and the generated host key."),
    "node.spool_dir": _K("path", "/var/spool/relayd", "Tenant inboxes, staging files and spool objects."),

    "gateway": _K("mapping", {}, "The SSH/SFTP front door."),
    "gateway.listen": _K("list of HOST:PORT", ["0.0.0.0:2222"], "Addresses to listen on: IPv4, [IPv6] "
                         "or a host name; '*' or an empty host means all IPv4 addresses."),
    "gateway.host_keys": _K("list of paths", [], "Private host key files (unencrypted OpenSSH/PEM). Empty: an "
                            "Ed25519 key is generated once in node.state_dir."),
    "gateway.login_timeout": _K("duration", "30s", "Time a client has to authenticate."),
    "gateway.max_auth_tries": _K("integer >= 1", 6, "Failed authentication attempts before the connection "
                                 "is closed."),
    "gateway.max_sessions_per_user": _K("integer >= 1", 16, "Concurrent SFTP sessions per login name."),
    "gateway.max_handles_per_session": _K("integer >= 1", 64, "Open file/directory handles per SFTP session."),
    "gateway.idle_timeout": _K("duration", "15m", "Close sessions idle this long (0: never)."),
    "gateway.max_startups": _K("integer >= 1", 128, "Concurrent connections not yet authenticated; further "
                               "ones are dropped at once (like sshd MaxStartups)."),
    "gateway.max_connections_per_ip": _K("integer >= 1", 64, "Concurrent connections from one source "
                                         "address; further ones are dropped at once."),
    "gateway.keepalive_interval": _K("duration", "30s", "SSH keepalive interval (0: off); 3 missed answers "
                                     "close the connection."),
    "gateway.drain_timeout": _K("duration", "60s", "On stop, how long uploads in progress may finish."),
    "gateway.algorithms": _K("mapping", {}, "SSH algorithm lists in preference order; a list replaces the "
                             "default for its kind."),
    "gateway.algorithms.kex": _K("list of strings", list(DEFAULT_ALGORITHMS["kex"]), "Key exchange."),
    "gateway.algorithms.ciphers": _K("list of strings", list(DEFAULT_ALGORITHMS["ciphers"]), "Ciphers."),
    "gateway.algorithms.macs": _K("list of strings", list(DEFAULT_ALGORITHMS["macs"]),
                                  "MACs (unused with AEAD ciphers)."),
    "gateway.algorithms.signatures": _K("list of strings", list(DEFAULT_ALGORITHMS["signatures"]),
                                        "Host key and user key signature algorithms."),
    "gateway.algorithms.compression": _K("list of strings", list(DEFAULT_ALGORITHMS["compression"]),
                                         "Compression (none, zlib@openssh.com, zlib)."),

    "tenants": _K("mapping", {}, "Tenants by name; each has its own chrooted inbox and spool."),
    "tenants.<name>": _K("mapping", {}, "One tenant (name: letters, digits, '.', '_', '-'; max 64)."),
    "tenants.<name>.quota": _K("mapping", {}, "Tenant-wide limits over all its stored files."),
    "tenants.<name>.quota.bytes": _K("size > 0", None, "Total bytes the tenant may store; not set: unlimited."),
    "tenants.<name>.quota.files": _K("integer >= 1", None, "Number of files the tenant may store; not set: "
                                     "unlimited."),
    "tenants.<name>.max_file_size": _K("size > 0", None, "Largest single upload; not set: unlimited."),
    "tenants.<name>.commit": _K("close | rename", "close", "When an upload is committed: on close, or on the "
                                "rename of a temp-named upload to its final name."),
    "tenants.<name>.temp_patterns": _K("list of globs", list(DEFAULT_TEMP_PATTERNS), "File names (last path "
                                       "component) treated as temporary with commit: rename."),
    "tenants.<name>.cert_authorities": _K("list of public keys", [], "Bare CA public keys; a user may log "
                                          "in with an OpenSSH certificate from one of them whose principals "
                                          "name the login."),
    "tenants.<name>.retention": _K("duration", "7d", "How long a spool object is kept after all its "
                                   "deliveries are final."),
    "tenants.<name>.users": _K("list of mappings", [], "Logins of this tenant; login names are unique across "
                               "all tenants."),
    "tenants.<name>.users[].name": _K("name", REQUIRED, "Login name."),
    "tenants.<name>.users[].authorized_keys": _K("list of public keys", [], "OpenSSH authorized_keys lines "
                                                 "(options allowed), one per item."),
    "tenants.<name>.users[].authorized_keys_file": _K("path", None, "An authorized_keys file, read when the "
                                                      "config is loaded (and on reload)."),
    "tenants.<name>.users[].password_hash": _K("string", None, "argon2id ($argon2id$...) or bcrypt ($2b$...) "
                                               "hash; make one with `relayd hash-password`. Plaintext is "
                                               "refused."),
    "tenants.<name>.users[].permissions": _K("list", sorted(DEFAULT_PERMISSIONS), "Any of list, download, "
                                             "upload, overwrite, delete, rename, mkdir."),
    "tenants.<name>.routes": _K("list of mappings", [], "Where committed files go; every matching route "
                                "applies."),
    "tenants.<name>.routes[].match": _K("glob", REQUIRED, "Path inside the tenant root: * and ? stay within "
                                        "a directory, ** matches any number of directories, [abc] a class."),
    "tenants.<name>.routes[].to": _K("list of destination names", REQUIRED, "Destinations that receive the "
                                     "matching files."),

    "destinations": _K("mapping", {}, "Delivery targets by name, used by routes."),
    "destinations.<name>": _K("mapping", {}, "One delivery target (name: letters, digits, '.', '_', '-')."),
    "destinations.<name>.type": _K("local | sftp | relayd", REQUIRED, "Kind of destination."),
    "destinations.<name>.path": _K("string", REQUIRED, "Target directory (local: on this host, relative to "
                                   "the config file; sftp/relayd: on the remote host); {tenant} is replaced "
                                   "by the tenant name."),
    "destinations.<name>.host": _K("string", None, "Remote host name or address.", _REMOTE, _REMOTE),
    "destinations.<name>.port": _K("integer 1-65535", None, "Remote SSH port; not set: 22 for sftp, 2222 "
                                   "for relayd.", _REMOTE),
    "destinations.<name>.user": _K("string", None, "Remote login name.", _REMOTE, _REMOTE),
    "destinations.<name>.identity": _K("path", None, "Private key file for the remote login.", _REMOTE,
                                       _REMOTE),
    "destinations.<name>.known_hosts": _K("path", None, "known_hosts file pinning the remote host key.",
                                          _REMOTE, _REMOTE),
    "destinations.<name>.concurrency": _K("integer >= 1", 4, "Deliveries run in parallel to this destination."),
    "destinations.<name>.verify": _K("boolean", True, "Confirm size and SHA-256 at the far end before the "
                                     "final rename.", ("local", "sftp")),
    "destinations.<name>.on_conflict": _K("string", None, "What to do when the final name already exists "
                                          "(interpreted by the delivery engine).", ("local", "sftp")),
    "destinations.<name>.sidecar": _K("boolean", False, "Also write the signed manifest next to the file.",
                                      ("local", "sftp")),
    "destinations.<name>.hmac_key_file": _K("path", None, "Key file for an HMAC over delivered sidecars.",
                                            ("local", "sftp")),
    "destinations.<name>.max_attempts": _K("integer >= 1", None, "Give up (failed) after this many attempts; "
                                           "not set: no limit.", _REMOTE),
    "destinations.<name>.max_age": _K("duration", None, "Give up (failed) when a delivery is older than "
                                      "this; not set: no limit.", _REMOTE),
    "destinations.<name>.connect_timeout": _K("duration", "30s", "TCP connect + SSH handshake timeout.",
                                              _REMOTE),
    "destinations.<name>.idle_timeout": _K("duration", "5m", "Close an unused connection after this long.",
                                           _REMOTE),
    "destinations.<name>.block_size": _K("size > 0", "256KiB", "SFTP read/write block size.", ("sftp",)),
    "destinations.<name>.requests": _K("integer >= 1", 64, "Parallel SFTP requests in flight per file.",
                                       ("sftp",)),
})

#: One line per key: ``type; default ...; meaning``. Rendered from :data:`KEYS`.
SCHEMA: dict[str, str] = {path: spec.summary() for path, spec in KEYS.items()}


@lru_cache(maxsize=None)
def _section_keys(section: str, dtype: str | None = None) -> frozenset[str]:
    """The keys allowed directly under ``section`` (``""`` is the top level)."""
    prefix = f"{section}." if section else ""
    out = set()
    for path, spec in KEYS.items():
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if "." not in rest and "[]" not in rest and (dtype is None or not spec.types or dtype in spec.types):
                out.add(rest)
    if not out:
        raise KeyError(f"no such config section: {section!r}")  # a programming error, caught in tests
    return frozenset(out)


@lru_cache(maxsize=None)
def _section_required(section: str, dtype: str | None = None) -> tuple[str, ...]:
    """The keys that must be present under ``section`` (for destination type ``dtype``)."""
    prefix = f"{section}." if section else ""
    return tuple(k for k in sorted(_section_keys(section, dtype))
                 if KEYS[prefix + k].required or (dtype is not None and dtype in KEYS[prefix + k].required_for))


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
_NAME_RULE = "use letters, digits, '.', '_' or '-', starting with a letter or digit (max 64)"
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_BCRYPT_RE = re.compile(r"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one ``key.path: problem`` line each."""

    exit_code = 2

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def parse_size(value: Any) -> int:
    """Parse ``10GiB``, ``5GB``, ``512k`` or a plain integer into bytes (``ValueError`` if bad).

    Decimal units (k, KB, M, ...) are powers of 1000, binary ones (KiB, Ki, MiB, ...) of 1024.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 10GiB, got {_kind(value)}")
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
        if value.strip().startswith("-"):
            raise ValueError("must not be negative")
    raise ValueError(f"expected a size such as 10GiB, got {_kind(value)}")


def parse_duration(value: Any) -> float:
    """Parse ``30s``, ``5m``, ``7d``, ``250ms`` or a plain number of seconds (``ValueError`` if bad)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, got {_kind(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite duration, got {value}")
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
        if value.strip().startswith("-"):
            raise ValueError("must not be negative")
    raise ValueError(f"expected a duration such as 30s, 5m or 7d, got {_kind(value)}")


@lru_cache(maxsize=1024)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a route ``match`` glob; raise ``ValueError`` naming the problem if it is invalid.

    The pattern is matched against a file's path inside the tenant root (a leading ``/`` on
    either side is ignored). ``*`` and ``?`` never cross a ``/``; a segment that is exactly
    ``**`` matches any number of directories (``**`` alone matches every path); ``[abc]``,
    ``[a-z]`` and ``[!abc]`` are character classes.
    """
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError("empty pattern")
    if "\0" in pattern:
        raise ValueError("contains a NUL character")
    segments = pattern.strip("/").split("/") if pattern != "/" else []
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append(".+" if last else "(?:[^/]+/)*")
            continue
        if not seg:
            raise ValueError("empty path segment ('//')")
        if seg in (".", ".."):
            raise ValueError(f"'{seg}' segments are not allowed")
        if "**" in seg:
            raise ValueError("'**' must be a whole path segment (like a/**/b)")
        out.append(_translate_segment(seg) + ("" if last else "/"))
    return re.compile(r"\A" + "".join(out) + r"\Z", re.DOTALL)


def _translate_segment(seg: str) -> str:
    res: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        i += 1
        if c == "*":
            res.append("[^/]*")
        elif c == "?":
            res.append("[^/]")
        elif c == "[":
            j = i
            if j < n and seg[j] in "!^":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:
                raise ValueError("unclosed '[' character class")
            body = seg[i:j]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            if not body:
                raise ValueError("empty '[]' character class")
            body = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            res.append(("[^/" if negate else "[") + body + "]")
            try:
                re.compile(res[-1])
            except re.error as exc:
                raise ValueError(f"invalid character class [{seg[i:j]}]: {exc}") from None
            i = j + 1
        else:
            res.append(re.escape(c))
    return "".join(res)


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
    max_startups: int = 128
    max_connections_per_ip: int = 64
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

    def matches(self, path: str) -> bool:
        """True if ``path`` (inside the tenant root, e.g. ``/in/a.csv``) matches ``match``."""
        return glob_to_regex(self.match).match(path.lstrip("/")) is not None


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
    """A delivery target. ``options`` holds the type-specific keys (everything but ``type``).

    Values are normalized: durations in seconds (float), sizes in bytes, ``identity``,
    ``known_hosts`` and ``hmac_key_file`` as absolute paths, and the schema defaults of
    :data:`KEYS` filled in for keys that have one. The mapping is read-only.
    """

    name: str
    type: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration (``tenants`` and ``destinations`` are read-only)."""

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

_Node = Any  # a raw YAML value: dict, list, str, int, float, bool, None, date, bytes


def _kind(value: Any) -> str:
    """A short human description of a raw YAML value, for error messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {shown!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(key: str, allowed: frozenset[str] | set[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None


def _did_you_mean(key: str, allowed: frozenset[str] | set[str]) -> str:
    hint = _closest(key, allowed)
    return f" (did you mean {hint!r}?)" if hint else ""


class _Checker:
    """Collects errors with key paths while walking the raw YAML tree."""

    def __init__(self, base_dir: Path):
        self.errors: list[str] = []
        self.base_dir = base_dir

    def err(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def mapping(self, path: str, value: _Node, section: str, dtype: str | None = None,
                extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Check a mapping against the schema section; return its known keys, or None if not a mapping.

        ``None`` (an empty YAML value) counts as an empty mapping. Unknown keys and missing
        required keys are reported; ``extra`` keys are accepted (for tailored messages).
        """
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {_kind(value)}")
            return None
        allowed = _section_keys(section, dtype) | set(extra)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.err(path, f"keys must be strings, got {_kind(key)}")
            elif key in allowed:
                out[key] = item
            elif dtype is not None and key in _section_keys(section):
                only = ", ".join(KEYS[f"{section}.{key}"].types)
                self.err(_join(path, key), f"not used by {dtype} destinations (only by type {only})")
            else:
                self.err(_join(path, key), "unknown key" + _did_you_mean(key, allowed))
        for key in _section_required(section, dtype):
            if out.get(key) is None:
                self.err(_join(path, key), "is required")
        return out

    def string(self, path: str, value: _Node, default: str | None = None) -> Any:
        """A non-empty string without NUL characters, or ``default`` if not set."""
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            self.err(path, f"expected a non-empty string, got {_kind(value)}")
            return default
        if "\0" in value:
            self.err(path, "must not contain NUL characters")
            return default
        return value

    def name(self, path: str, value: _Node) -> str | None:
        """A tenant/user/node/destination name."""
        s = self.string(path, value)
        if s is not None and not _NAME_RE.match(s):
            self.err(path, f"invalid name {s!r}: {_NAME_RULE}")
            return None
        return s

    def integer(self, path: str, value: _Node, default: Any, minimum: int = 0,
                maximum: int | None = None) -> Any:
        """An integer within bounds, or ``default`` if not set or invalid."""
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"expected an integer, got {_kind(value)}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self.err(path, f"must be at least {minimum}" if maximum is None
                     else f"must be between {minimum} and {maximum}")
            return default
        return value

    def boolean(self, path: str, value: _Node, default: Any) -> Any:
        """true/false, or ``default`` if not set."""
        if value is None:
            return default
        if not isinstance(value, bool):
            self.err(path, f"expected true or false, got {_kind(value)}")
            return default
        return value

    def size(self, path: str, value: _Node, default: Any, positive: bool = True) -> Any:
        """A size in bytes (``10GiB``); ``positive`` refuses 0."""
        if value is None:
            return default
        try:
            n = parse_size(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return default
        if positive and n <= 0:
            self.err(path, "must be greater than 0 (leave the key out for no limit)")
            return default
        return n

    def duration(self, path: str, value: _Node, default: Any, positive: bool = False) -> Any:
        """A duration in seconds (``30s``, ``5m``); ``positive`` refuses 0."""
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return default
        if positive and seconds <= 0:
            self.err(path, "must be greater than 0")
            return default
        return seconds

    def str_items(self, path: str, value: _Node) -> list[tuple[str, str]]:
        """The strings of a list (or a single string) with their own key paths."""
        if value is None:
            return []
        if isinstance(value, str):  # a single item may be written without the list
            if not value.strip():
                return self._bad_item(path, value)
            if "\0" in value:
                self.err(path, "must not contain NUL characters")
                return []
            return [(path, value)]
        if not isinstance(value, list):
            self.err(path, f"expected a list of strings, got {_kind(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            ipath = f"{path}[{i}]"
            if not isinstance(item, str) or not item.strip():
                self._bad_item(ipath, item)
            elif "\0" in item:
                self.err(ipath, "must not contain NUL characters")
            else:
                out.append((ipath, item))
        return out

    def _bad_item(self, path: str, item: Any) -> list[tuple[str, str]]:
        self.err(path, f"expected a non-empty string, got {_kind(item)}")
        return []

    def str_list(self, path: str, value: _Node) -> tuple[str, ...]:
        """Like :meth:`str_items`, just the strings."""
        return tuple(s for _, s in self.str_items(path, value))

    def list_of(self, path: str, value: _Node) -> list[tuple[str, Any]]:
        """The items of a list with their key paths (``path[i]``)."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, f"expected a list, got {_kind(value)}")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    def path(self, path: str, value: _Node) -> Path | None:
        """A file system path; relative ones are relative to the config file's folder."""
        s = self.string(path, value)
        if s is None:
            return None
        try:
            p = Path(s).expanduser()
        except RuntimeError as exc:  # ~user that does not exist
            self.err(path, f"cannot expand {s!r}: {exc}")
            return None
        return p if p.is_absolute() else (self.base_dir / p)

    def read_file(self, path: str, p: Path) -> str | None:
        """The text of file ``p``; every failure becomes one error at ``path``."""
        try:
            if p.is_dir():
                self.err(path, f"{p} is a directory, not a file")
                return None
            return p.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.err(path, f"file not found: {p}")
        except OSError as exc:
            self.err(path, f"cannot read {p}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            self.err(path, f"{p} is not UTF-8 text")
        except ValueError as exc:
            self.err(path, f"cannot read {p}: {exc}")
        return None

    def existing_file(self, path: str, p: Path | None) -> None:
        """Report ``p`` if it is not an existing regular file."""
        if p is None:
            return
        try:
            if p.is_dir():
                self.err(path, f"{p} is a directory, not a file")
            elif not p.exists():
                self.err(path, f"file not found: {p}")
        except (OSError, ValueError) as exc:
            self.err(path, f"cannot access {p}: {exc}")


def _parse_host_port(item: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); ``ValueError`` with the problem."""
    s = item.strip()
    if s.startswith("["):
        m = re.match(r"^\[([^\]]*)\]:(\d+)$", s)
        if not m:
            raise ValueError("expected [IPV6]:PORT")
        host, port_s = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise ValueError("missing :PORT (e.g. 0.0.0.0:2222)")
        if ":" in host:
            raise ValueError("put IPv6 addresses in brackets, e.g. [::1]:2222")
        if host in ("", "*"):
            host = "0.0.0.0"
        elif re.fullmatch(r"[\d.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv4 address") from None
        elif not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is not an IP address or host name")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_s!r}")
    return host, int(port_s)


def _parse_listen(ck: _Checker, path: str, value: _Node) -> tuple[tuple[str, int], ...]:
    if value is None:
        return GatewayConfig.listen
    if isinstance(value, list) and not value:
        ck.err(path, "needs at least one HOST:PORT")
        return GatewayConfig.listen
    out: list[tuple[str, int]] = []
    for ipath, item in ck.str_items(path, value):
        try:
            addr = _parse_host_port(item)
        except ValueError as exc:
            ck.err(ipath, f"{exc}; expected HOST:PORT such as 0.0.0.0:2222, [::]:2222 or gw.example.com:22")
            continue
        if addr in out:
            ck.err(ipath, f"duplicate listen address {item!r}")
            continue
        out.append(addr)
    return tuple(out)


def _parse_algorithms(ck: _Checker, path: str, raw: _Node) -> AlgorithmsConfig:
    raw = ck.mapping(path, raw, "gateway.algorithms")
    if not raw:
        return AlgorithmsConfig()
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
    values: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        kpath = _join(path, key)
        if isinstance(value, list) and not value:
            ck.err(kpath, "needs at least one algorithm")
            continue
        names = []
        for ipath, name in ck.str_items(kpath, value):
            if name not in supported[key]:
                ck.err(ipath, f"unsupported algorithm {name!r}" + _did_you_mean(name, supported[key]))
            else:
                names.append(name)
        if names:
            values[key] = tuple(names)
    return AlgorithmsConfig(**values)


def _parse_node(ck: _Checker, raw: _Node) -> NodeConfig:
    default = NodeConfig(id="relayd", state_dir=Path(KEYS["node.state_dir"].default),
                         spool_dir=Path(KEYS["node.spool_dir"].default))
    if raw is None:  # already reported as required
        return default
    raw = ck.mapping("node", raw, "node")
    if raw is None:
        return default
    dirs = {}
    for key in ("state_dir", "spool_dir"):
        p = ck.path(f"node.{key}", raw.get(key))
        if p is not None:
            try:
                if p.exists() and not p.is_dir():
                    ck.err(f"node.{key}", f"{p} exists and is not a directory")
            except (OSError, ValueError) as exc:
                ck.err(f"node.{key}", f"cannot access {p}: {exc}")
        dirs[key] = p or getattr(default, key)
    return NodeConfig(id=ck.name("node.id", raw.get("id")) or default.id, **dirs)


def _parse_host_keys(ck: _Checker, value: _Node) -> tuple[Path, ...]:
    import asyncssh

    out: list[Path] = []
    for ipath, item in ck.str_items("gateway.host_keys", value):
        p = ck.path(ipath, item)
        if p is None:
            continue
        text = ck.read_file(ipath, p)
        if text is None:
            continue
        try:
            asyncssh.import_private_key(text)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a config error
            ck.err(ipath, f"{p} is not a usable private host key ({exc})")
            continue
        if p in out:
            ck.err(ipath, f"duplicate host key {item!r}")
            continue
        out.append(p)
    return tuple(out)


def _parse_gateway(ck: _Checker, raw: _Node) -> GatewayConfig:
    d = GatewayConfig()
    raw = ck.mapping("gateway", raw, "gateway")
    if raw is None:
        return d
    g = "gateway."
    return GatewayConfig(
        listen=_parse_listen(ck, g + "listen", raw.get("listen")),
        host_keys=_parse_host_keys(ck, raw.get("host_keys")),
        login_timeout=ck.duration(g + "login_timeout", raw.get("login_timeout"), d.login_timeout, positive=True),
        max_auth_tries=ck.integer(g + "max_auth_tries", raw.get("max_auth_tries"), d.max_auth_tries, 1),
        max_sessions_per_user=ck.integer(g + "max_sessions_per_user", raw.get("max_sessions_per_user"),
                                         d.max_sessions_per_user, 1),
        max_handles_per_session=ck.integer(g + "max_handles_per_session", raw.get("max_handles_per_session"),
                                           d.max_handles_per_session, 1),
        idle_timeout=ck.duration(g + "idle_timeout", raw.get("idle_timeout"), d.idle_timeout),
        max_startups=ck.integer(g + "max_startups", raw.get("max_startups"), d.max_startups, 1),
        max_connections_per_ip=ck.integer(g + "max_connections_per_ip", raw.get("max_connections_per_ip"),
                                          d.max_connections_per_ip, 1),
        keepalive_interval=ck.duration(g + "keepalive_interval", raw.get("keepalive_interval"),
                                       d.keepalive_interval),
        drain_timeout=ck.duration(g + "drain_timeout", raw.get("drain_timeout"), d.drain_timeout),
        algorithms=_parse_algorithms(ck, g + "algorithms", raw.get("algorithms")),
    )


def _public_key_problem(line: str, *, ca: bool = False) -> str | None:
    """Why ``line`` is not a usable authorized_keys line (or CA key), or None if it is."""
    import asyncssh

    if line.lstrip().startswith(("-----BEGIN", "PuTTY-User-Key-File")):
        return "this looks like a private key; give the public key (the .pub file's line)"
    if "\n" in line.strip():
        return "one key per list item (this item has several lines)"
    try:
        asyncssh.import_authorized_keys(line)
    except Exception as exc:  # noqa: BLE001 - asyncssh raises several types for bad input
        return f"not a valid OpenSSH public key line ({exc})"
    if ca and line.lstrip().startswith(("cert-authority", "from=", "principals=")):
        return "give the bare CA public key; relayd adds the options itself"
    return None


def _password_hash_problem(value: str) -> str | None:
    """Why ``value`` is not an accepted password hash (never echoing the value), or None."""
    if value.startswith("$argon2id$"):
        try:
            import argon2

            argon2.extract_parameters(value)
        except Exception:  # noqa: BLE001
            return "malformed argon2id hash (make one with: relayd hash-password)"
        return None
    if value.startswith(("$2a$", "$2b$", "$2y$")):
        return None if _BCRYPT_RE.match(value) else "malformed bcrypt hash"
    if value.startswith(("$argon2i$", "$argon2d$")):
        return "only argon2id among the argon2 variants is accepted (make one with: relayd hash-password)"
    return ("must be an argon2id ($argon2id$...) or bcrypt ($2b$...) hash; plaintext passwords are refused "
            "(make a hash with: relayd hash-password)")


def _parse_user(ck: _Checker, path: str, raw: _Node, tenant: str, has_ca: bool = False) -> UserConfig | None:
    """One login; with ``has_ca`` (tenant CAs) a user may rely on certificates alone."""
    raw = ck.mapping(path, raw, "tenants.<name>.users[]", extra=("password",))
    if raw is None:
        return None
    name = ck.name(_join(path, "name"), raw.get("name"))
    if "password" in raw:
        ck.err(_join(path, "password"), "plaintext passwords are refused; use password_hash "
               "(make one with: relayd hash-password)")
    errors_before = len(ck.errors)
    keys: list[str] = []
    for ipath, line in ck.str_items(_join(path, "authorized_keys"), raw.get("authorized_keys")):
        problem = _public_key_problem(line)
        if problem:
            ck.err(ipath, problem)
        else:
            keys.append(line.strip())
    kpath = _join(path, "authorized_keys_file")
    keys_file = ck.path(kpath, raw.get("authorized_keys_file"))
    text: str | None = None
    if keys_file is not None:
        text = ck.read_file(kpath, keys_file)
        for lineno, line in enumerate((text or "").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                problem = _public_key_problem(line)
                if problem:
                    ck.err(kpath, f"{keys_file} line {lineno}: {problem}")
                else:
                    keys.append(line.strip())
    pw_hash = ck.string(_join(path, "password_hash"), raw.get("password_hash"))
    if pw_hash is not None:
        problem = _password_hash_problem(pw_hash)
        if problem:
            ck.err(_join(path, "password_hash"), problem)
    credential_errors = len(ck.errors) > errors_before
    perms = DEFAULT_PERMISSIONS
    if raw.get("permissions") is not None:
        given = set()
        for ipath, p in ck.str_items(_join(path, "permissions"), raw.get("permissions")):
            if p in PERMISSIONS:
                given.add(p)
            else:
                ck.err(ipath, f"unknown permission {p!r}{_did_you_mean(p, PERMISSIONS)} "
                       f"(known: {', '.join(sorted(PERMISSIONS))})")
        perms = frozenset(given)
    if name is not None and not keys and pw_hash is None and not credential_errors and not has_ca:
        if keys_file is None:
            ck.err(path, "user has no authorized_keys, authorized_keys_file or password_hash and the tenant "
                   "has no cert_authorities; it could never log in")
        elif text is not None:
            ck.err(kpath, f"{keys_file} has no keys and the user has no other credential; "
                   "it could never log in")
    if name is None:
        return None
    return UserConfig(name=name, tenant=tenant, authorized_keys=tuple(keys), authorized_keys_file=keys_file,
                      password_hash=pw_hash, permissions=perms)


def _parse_routes(ck: _Checker, path: str, value: _Node,
                  destinations: Mapping[str, Any]) -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    for rpath, r in ck.list_of(path, value):
        r = ck.mapping(rpath, r, "tenants.<name>.routes[]")
        if r is None:
            continue
        match = ck.string(_join(rpath, "match"), r.get("match"))
        if match is not None:
            try:
                glob_to_regex(match)
            except ValueError as exc:
                ck.err(_join(rpath, "match"), f"invalid glob {match!r}: {exc}")
                match = None
        to_value = r.get("to")
        if isinstance(to_value, list) and not to_value:
            ck.err(_join(rpath, "to"), "needs at least one destination")
        to = []
        for ipath, dest in ck.str_items(_join(rpath, "to"), to_value):
            if dest not in destinations:
                ck.err(ipath, f"unknown destination {dest!r}" + (
                    f"{_did_you_mean(dest, set(destinations))} (defined: {', '.join(sorted(destinations))})"
                    if destinations else " (no destinations are defined)"))
            else:
                to.append(dest)
        if match is not None and to:
            routes.append(RouteConfig(match=match, to=tuple(to)))
    return tuple(routes)


def _parse_tenant(ck: _Checker, name: str, raw: _Node,
                  destinations: Mapping[str, Any]) -> tuple[TenantConfig, list[tuple[str, UserConfig]]]:
    """One tenant, plus its users with their key paths (for the global uniqueness check)."""
    path = f"tenants.{name}"
    if not _NAME_RE.match(name):
        ck.err(path, f"invalid tenant name: {_NAME_RULE}")
    raw = ck.mapping(path, raw, "tenants.<name>")
    if raw is None:
        return TenantConfig(name=name), []
    quota_raw = ck.mapping(_join(path, "quota"), raw.get("quota"), "tenants.<name>.quota") or {}
    quota = QuotaConfig(
        bytes=ck.size(f"{path}.quota.bytes", quota_raw.get("bytes"), None),
        files=ck.integer(f"{path}.quota.files", quota_raw.get("files"), None, 1),
    )
    commit = raw.get("commit")
    if commit is None:
        commit = "close"
    elif not isinstance(commit, str) or commit not in COMMIT_MODES:
        ck.err(_join(path, "commit"), f"must be 'close' or 'rename', got {_kind(commit)}")
        commit = "close"
    temp_patterns = DEFAULT_TEMP_PATTERNS
    if raw.get("temp_patterns") is not None:
        pats = []
        for ipath, pat in ck.str_items(_join(path, "temp_patterns"), raw.get("temp_patterns")):
            if "/" in pat:
                ck.err(ipath, f"temp patterns match a file name, not a path; drop the '/' in {pat!r}")
            else:
                pats.append(pat)
        temp_patterns = tuple(pats)  # type: ignore[assignment]
    cas = []
    for ipath, line in ck.str_items(_join(path, "cert_authorities"), raw.get("cert_authorities")):
        problem = _public_key_problem(line, ca=True)
        if problem:
            ck.err(ipath, problem)
        else:
            cas.append(line.strip())
    users: list[tuple[str, UserConfig]] = []
    for upath, u in ck.list_of(_join(path, "users"), raw.get("users")):
        user = _parse_user(ck, upath, u, name, has_ca=bool(cas))
        if user is not None:
            users.append((upath, user))
    tenant = TenantConfig(
        name=name, users=tuple(u for _, u in users), quota=quota,
        max_file_size=ck.size(_join(path, "max_file_size"), raw.get("max_file_size"), None),
        commit=commit, temp_patterns=temp_patterns, cert_authorities=tuple(cas),
        routes=_parse_routes(ck, _join(path, "routes"), raw.get("routes"), destinations),
        retention=ck.duration(_join(path, "retention"), raw.get("retention"), TenantConfig.retention),
    )
    return tenant, users


def _dest_host(ck: _Checker, path: str, value: _Node) -> Any:
    s = ck.string(path, value)
    if s is not None:
        try:
            _parse_host_port(f"[{s}]:1" if ":" in s else f"{s}:1")
        except ValueError:
            ck.err(path, f"{s!r} is not an IP address or host name")
            return None
    return s


def _dest_file(ck: _Checker, path: str, value: _Node) -> Any:
    p = ck.path(path, value)
    ck.existing_file(path, p)
    return p


_DestConvert = Callable[[_Checker, str, _Node], Any]

#: How each ``destinations.<name>.*`` value is checked and normalized (``type`` is handled apart).
_DEST_CONVERTERS: dict[str, _DestConvert] = {
    "path": lambda ck, p, v: ck.string(p, v),
    "host": _dest_host,
    "port": lambda ck, p, v: ck.integer(p, v, None, 1, 65535),
    "user": lambda ck, p, v: ck.string(p, v),
    "identity": _dest_file,
    "known_hosts": _dest_file,
    "hmac_key_file": _dest_file,
    "concurrency": lambda ck, p, v: ck.integer(p, v, None, 1),
    "verify": lambda ck, p, v: ck.boolean(p, v, None),
    "on_conflict": lambda ck, p, v: ck.string(p, v),
    "sidecar": lambda ck, p, v: ck.boolean(p, v, None),
    "max_attempts": lambda ck, p, v: ck.integer(p, v, None, 1),
    "max_age": lambda ck, p, v: ck.duration(p, v, None, positive=True),
    "connect_timeout": lambda ck, p, v: ck.duration(p, v, None, positive=True),
    "idle_timeout": lambda ck, p, v: ck.duration(p, v, None),
    "block_size": lambda ck, p, v: ck.size(p, v, None),
    "requests": lambda ck, p, v: ck.integer(p, v, None, 1),
}


def _parse_destination(ck: _Checker, name: str, raw: _Node) -> DestinationConfig | None:
    path = f"destinations.{name}"
    if not _NAME_RE.match(name):
        ck.err(path, f"invalid destination name: {_NAME_RULE}")
    if not isinstance(raw, dict):
        ck.err(path, f"expected a mapping, got {_kind(raw)}")
        return None
    dtype = raw.get("type")
    if dtype is None:
        ck.err(_join(path, "type"), f"is required (one of {', '.join(DESTINATION_TYPES)})")
        return None
    if not isinstance(dtype, str) or dtype not in DESTINATION_TYPES:
        ck.err(_join(path, "type"), f"must be one of {', '.join(DESTINATION_TYPES)}, got {_kind(dtype)}")
        return None
    section = "destinations.<name>"
    raw = ck.mapping(path, raw, section, dtype) or {}
    options: dict[str, Any] = {}
    for key in sorted(_section_keys(section, dtype) - {"type"}):
        value = raw.get(key)
        if value is None:
            value = KEYS[f"{section}.{key}"].default
            if value is None or value is REQUIRED:
                continue
        converted = _DEST_CONVERTERS[key](ck, _join(path, key), value)
        if converted is not None:
            options[key] = converted
    return DestinationConfig(name=name, type=dtype, options=MappingProxyType(options))


def _named_items(ck: _Checker, path: str, value: _Node, what: str) -> list[tuple[str, Any]]:
    """The entries of a name → settings mapping (``tenants``, ``destinations``) with string names."""
    if value is None:
        return []
    if not isinstance(value, dict):
        ck.err(path, f"expected a mapping of {what} names to settings, got {_kind(value)}")
        return []
    out = []
    for key, item in value.items():
        if isinstance(key, str):
            out.append((key, item))
        else:
            ck.err(f"{path}.{key}", f"{what} names must be strings, got {_kind(key)} (quote it)")
    return out


def parse_config(data: Any, base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Validate a raw YAML tree and build the frozen :class:`Config`; raise :class:`ConfigError`.

    Relative paths are resolved against ``base_dir`` (default: the current directory). Every
    problem found is reported, each as one ``key.path: problem`` line.
    """
    label = str(source) if source is not None else "config"
    if not isinstance(data, dict):
        raise ConfigError([f"{label}: expected a mapping with the sections node, gateway, tenants and "
                           f"destinations at the top level, got {_kind(data)}"])
    ck = _Checker(base_dir or Path.cwd())
    try:
        return _build(ck, data, source)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - never a traceback for a config problem
        raise ConfigError([*ck.errors, f"{label}: unexpected error while validating "
                           f"({type(exc).__name__}: {exc}); please report this"]) from exc


def _build(ck: _Checker, data: dict[Any, Any], source: Path | None) -> Config:
    top = ck.mapping("", data, "") or {}
    node = _parse_node(ck, top.get("node"))
    gateway = _parse_gateway(ck, top.get("gateway"))
    dest_items = _named_items(ck, "destinations", top.get("destinations"), "destination")
    dest_names = {name for name, _ in dest_items}
    destinations: dict[str, DestinationConfig] = {}
    for dname, draw in dest_items:
        dest = _parse_destination(ck, dname, draw)
        if dest is not None:
            destinations[dname] = dest
    tenants: dict[str, TenantConfig] = {}
    seen: dict[str, str] = {}
    for tname, traw in _named_items(ck, "tenants", top.get("tenants"), "tenant"):
        tenant, users = _parse_tenant(ck, tname, traw, dict.fromkeys(dest_names))
        tenants[tname] = tenant
        for upath, user in users:
            if user.name in seen:
                where = "this tenant" if seen[user.name] == tname else f"tenant {seen[user.name]!r}"
                ck.err(f"{upath}.name", f"user {user.name!r} is already defined in {where}; "
                       "login names are global")
            else:
                seen[user.name] = tname
    if ck.errors:
        raise ConfigError(ck.errors)
    return Config(node=node, gateway=gateway, tenants=MappingProxyType(tenants),
                  destinations=MappingProxyType(destinations), source=source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent overwrite hides mistakes)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: SafeLoader reports it below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: invalid YAML: problem`` on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and getattr(exc, "problem", None):
        problem = f"{problem} ({context})"
    return f"{where}invalid YAML: " + " ".join(str(problem).split())


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Relative paths in it are relative to its folder.

    Every failure (unreadable file, bad YAML, invalid values) raises :class:`ConfigError`.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise ConfigError([f"{p}: cannot read config: is a directory"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: config is not UTF-8 text (byte {exc.start})"]) from None
    except ValueError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: {_yaml_problem(exc)}"]) from None
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
        raise ConfigError([f"{p}: cannot parse YAML ({type(exc).__name__})"]) from None
    if data is None:
        raise ConfigError([f"{p}: config is empty"])
    resolved = p.resolve()
    return parse_config(data, base_dir=resolved.parent, source=resolved)
