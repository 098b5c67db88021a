"""Typed, frozen config objects: what :func:`~relayd.config.load_config` returns."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from relayd.config.schema import (
    DEFAULT_ALGORITHMS, DEFAULT_DROP_TEMP_PATTERNS, DEFAULT_PERMISSIONS, DEFAULT_TEMP_PATTERNS,
)
from relayd.config.values import glob_to_regex


@dataclass(frozen=True)
class NodeConfig:
    """This gateway: its id and where it keeps state and spooled data."""

    id: str
    state_dir: Path
    spool_dir: Path


@dataclass(frozen=True)
class IntegrityConfig:
    """Signed manifests (see relayd.integrity)."""

    manifests: bool = True
    digests: tuple[str, ...] = ()
    """Extra digests next to sha256 (``sha3-256``, ``blake2b``)."""


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint."""

    enabled: bool = True
    listen: tuple[str, int] = ("127.0.0.1", 9464)


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
    trusted_signers: tuple[str, ...] = ()
    """``ssh-ed25519 AAAA...`` lines: manifest signing keys a peer user's offers may be signed with."""


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

    def destinations_for(self, path: str) -> tuple[str, ...]:
        """Destinations of every route whose ``match`` fits ``path`` (in route order, no repeats)."""
        out: list[str] = []
        for route in self.routes:
            if route.matches(path):
                out.extend(d for d in route.to if d not in out)
        return tuple(out)

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
class DropFolderConfig:
    """A watched folder whose settled files are committed into ``tenant``'s inbox.

    ``path`` and ``move_to`` are absolute (relative ones are resolved against the config file's
    folder) but not resolved through symlinks: that happens when the folder is watched.
    ``after`` is ``delete``, ``keep`` or ``move`` (then ``move_to`` is set); ``into`` is the
    normalized inbox folder (``/`` or ``/a/b``).
    """

    path: Path
    tenant: str
    pattern: str = "**"
    recursive: bool = False
    settle: float = 5.0
    after: str = "delete"
    move_to: Path | None = None
    temp_patterns: tuple[str, ...] = DEFAULT_DROP_TEMP_PATTERNS
    into: str = "/"
    rescan: float = 60.0

    def is_temp_name(self, name: str) -> bool:
        """True if a file or folder name matches one of ``temp_patterns``."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.temp_patterns)


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration (``tenants`` and ``destinations`` are read-only)."""

    node: NodeConfig
    gateway: GatewayConfig
    tenants: Mapping[str, TenantConfig]
    destinations: Mapping[str, DestinationConfig]
    source: Path | None = None
    integrity: IntegrityConfig = IntegrityConfig()
    dropfolders: tuple[DropFolderConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()

    def find_user(self, username: str) -> UserConfig | None:
        """The user with this login name, or None."""
        for tenant in self.tenants.values():
            for user in tenant.users:
                if user.name == username:
                    return user
        return None
