"""Validation: turn a raw YAML tree into a :class:`~relayd.config.model.Config`, or report every problem."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from relayd.config.checker import _NAME_RE, _NAME_RULE, _Checker, _did_you_mean, _join, _Node
from relayd.config.model import (
    AlgorithmsConfig, Config, DestinationConfig, DropFolderConfig, GatewayConfig, IntegrityConfig, NodeConfig,
    QuotaConfig, RouteConfig, TenantConfig, UserConfig,
)
from relayd.config.model import MetricsConfig
from relayd.config.schema import (
    COMMIT_MODES, EXTRA_DIGEST_NAMES, DEFAULT_PERMISSIONS, DEFAULT_TEMP_PATTERNS, DESTINATION_TYPES, KEYS, PERMISSIONS, REQUIRED,
    _section_keys,
)
from relayd.config.values import ConfigError, _kind, glob_to_regex

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_BCRYPT_RE = re.compile(r"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")


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


def _parse_metrics(ck: _Checker, raw: _Node, gateway: GatewayConfig) -> MetricsConfig:
    d = MetricsConfig()
    raw = ck.mapping("metrics", raw, "metrics")
    if not raw:
        return d
    enabled = bool(ck.boolean("metrics.enabled", raw.get("enabled"), d.enabled))
    listen = d.listen
    value = raw.get("listen")
    if value is not None:
        if not isinstance(value, str):
            ck.err("metrics.listen", f"expected HOST:PORT such as 127.0.0.1:9464, got {_kind(value)}")
        else:
            try:
                listen = _parse_host_port(value)
            except ValueError as exc:
                ck.err("metrics.listen", f"{exc}; expected HOST:PORT such as 127.0.0.1:9464 or [::1]:9464")
                return d
    wildcard = ("0.0.0.0", "::")
    if enabled and any(port == listen[1] and (host == listen[0] or host in wildcard or listen[0] in wildcard)
                       for host, port in gateway.listen):
        ck.err("metrics.listen", f"{listen[0]}:{listen[1]} collides with an address in gateway.listen")
    return MetricsConfig(enabled=enabled, listen=listen)


def _parse_integrity(ck: _Checker, raw: _Node) -> IntegrityConfig:
    if raw is None:
        return IntegrityConfig()
    raw = ck.mapping("integrity", raw, "integrity")
    if raw is None:
        return IntegrityConfig()
    manifests = ck.boolean("integrity.manifests", raw.get("manifests"), True)
    digests: list[str] = []
    for ipath, name in ck.str_items("integrity.digests", raw.get("digests")):
        if name not in EXTRA_DIGEST_NAMES:
            ck.err(ipath, f"unknown digest {name!r} (known: {', '.join(EXTRA_DIGEST_NAMES)}; sha256 is always included)")
        elif name not in digests:
            digests.append(name)
    return IntegrityConfig(manifests=bool(manifests), digests=tuple(digests))


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
    signers: list[str] = []
    for ipath, line in ck.str_items(_join(path, "trusted_signers"), raw.get("trusted_signers")):
        fields = line.split()
        if len(fields) < 2 or fields[0] != "ssh-ed25519" or _public_key_problem(line):
            ck.err(ipath, "expected an Ed25519 public key line (ssh-ed25519 AAAA... [comment]), as printed by "
                   "`relayd keys show` on the sending gateway")
        else:
            signers.append(" ".join(fields[:2]))
    if signers and "peer" not in perms:
        ck.err(_join(path, "trusted_signers"), "only meaningful with the peer permission")
    if "peer" in perms and not signers and raw.get("trusted_signers") is None:
        ck.err(_join(path, "permissions"), "the peer permission needs trusted_signers (the sending gateway's "
               "manifest keys)")
    if name is None:
        return None
    return UserConfig(name=name, tenant=tenant, authorized_keys=tuple(keys), authorized_keys_file=keys_file,
                      password_hash=pw_hash, permissions=perms, trusted_signers=tuple(signers))


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
def _choice(ck: _Checker, path: str, value: _Node, allowed: tuple[str, ...]) -> str | None:
    if value not in allowed:
        ck.err(path, f"must be one of {', '.join(allowed)}, got {_kind(value)}")
        return None
    return str(value)


_DEST_CONVERTERS: dict[str, _DestConvert] = {
    "path": lambda ck, p, v: ck.string(p, v),
    "host": _dest_host,
    "port": lambda ck, p, v: ck.integer(p, v, None, 1, 65535),
    "user": lambda ck, p, v: ck.string(p, v),
    "identity": _dest_file,
    "known_hosts": _dest_file,
    "hmac_key_file": _dest_file,
    "concurrency": lambda ck, p, v: ck.integer(p, v, None, 1),
    "verify": lambda ck, p, v: _choice(ck, p, v, ("sha256", "size")),
    "on_conflict": lambda ck, p, v: _choice(ck, p, v, ("overwrite", "rename", "fail")),
    "sidecar": lambda ck, p, v: ck.boolean(p, v, None),
    "fsync": lambda ck, p, v: ck.boolean(p, v, None),
    "max_attempts": lambda ck, p, v: ck.integer(p, v, None, 1),
    "max_age": lambda ck, p, v: ck.duration(p, v, None, positive=True),
    "retry_initial": lambda ck, p, v: ck.duration(p, v, None, positive=True),
    "retry_max": lambda ck, p, v: ck.duration(p, v, None, positive=True),
    "connect_timeout": lambda ck, p, v: ck.duration(p, v, None, positive=True),
    "idle_timeout": lambda ck, p, v: ck.duration(p, v, None),
    "block_size": lambda ck, p, v: ck.size(p, v, None),
    "requests": lambda ck, p, v: ck.integer(p, v, None, 1),
    "streams": lambda ck, p, v: ck.integer(p, v, None, 1),
    "bulk_client": lambda ck, p, v: _choice(ck, p, v, ("auto", "openssh", "asyncssh")),
    "bulk_min_size": lambda ck, p, v: ck.size(p, v, None),
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
    if dtype == "local" and isinstance(options.get("path"), str) and not options["path"].startswith("/"):
        # A local target folder, like every local path in the config, is relative to the config file.
        options["path"] = str(ck.base_dir / options["path"])
    return DestinationConfig(name=name, type=dtype, options=MappingProxyType(options))


def _inside(path: str, folder: str) -> bool:
    """True if normalized absolute ``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _parse_dropfolder(ck: _Checker, path: str, raw: _Node, tenants: Mapping[str, Any]) -> DropFolderConfig | None:
    """One ``dropfolders[]`` item (existence of the folders is checked when relayd serve starts)."""
    raw = ck.mapping(path, raw, "dropfolders[]")
    if raw is None:
        return None
    folder = ck.path(_join(path, "path"), raw.get("path"))
    tenant = ck.name(_join(path, "tenant"), raw.get("tenant"))
    if tenant is not None and tenant not in tenants:
        ck.err(_join(path, "tenant"), f"unknown tenant {tenant!r}" + (
            f"{_did_you_mean(tenant, set(tenants))} (defined: {', '.join(sorted(tenants))})"
            if tenants else " (no tenants are defined)"))
        tenant = None
    d = DropFolderConfig(path=Path("/"), tenant="")
    pattern = ck.string(_join(path, "pattern"), raw.get("pattern"), d.pattern)
    try:
        glob_to_regex(pattern)
    except ValueError as exc:
        ck.err(_join(path, "pattern"), f"invalid glob {pattern!r}: {exc}")
    temp_patterns = d.temp_patterns
    if raw.get("temp_patterns") is not None:
        pats = []
        for ipath, pat in ck.str_items(_join(path, "temp_patterns"), raw.get("temp_patterns")):
            if "/" in pat:
                ck.err(ipath, f"temp patterns match a file or folder name, not a path; drop the '/' in {pat!r}")
            else:
                pats.append(pat)
        temp_patterns = tuple(pats)
    after, move_to = d.after, None
    value = raw.get("after")
    if value is not None:
        if isinstance(value, str) and value in ("delete", "keep"):
            after = value
        elif isinstance(value, str) and value.startswith("move:") and value[5:].strip():
            after, move_to = "move", ck.path(_join(path, "after"), value[5:].strip())
        else:
            ck.err(_join(path, "after"), f"must be delete, keep or move:DIR, got {_kind(value)}")
    into = ck.string(_join(path, "into"), raw.get("into"), d.into)
    parts = [c for c in into.split("/") if c not in ("", ".")]
    if ".." in parts or any(ord(ch) < 32 for ch in into):
        ck.err(_join(path, "into"), f"must be a folder inside the tenant's inbox (no '..', no control "
               f"characters), got {into!r}")
        parts = []
    recursive = bool(ck.boolean(_join(path, "recursive"), raw.get("recursive"), d.recursive))
    settle = ck.duration(_join(path, "settle"), raw.get("settle"), d.settle, positive=True)
    rescan = ck.duration(_join(path, "rescan"), raw.get("rescan"), d.rescan, positive=True)
    if folder is None or tenant is None:
        return None
    drop = DropFolderConfig(
        path=Path(os.path.normpath(folder)), tenant=tenant, pattern=pattern, recursive=recursive, settle=settle,
        after=after, move_to=Path(os.path.normpath(move_to)) if move_to is not None else None,
        temp_patterns=temp_patterns, into="/" + "/".join(parts), rescan=rescan)
    if drop.move_to is not None and _inside(str(drop.move_to), str(drop.path)):
        rel = os.path.relpath(drop.move_to, drop.path)
        if rel == "." or not any(drop.is_temp_name(c) for c in rel.split("/")):
            ck.err(_join(path, "after"), f"the move target {drop.move_to} is inside the watched folder; put it "
                   "outside or give it a name temp_patterns exclude (like .done)")
    return drop


def _parse_dropfolders(ck: _Checker, value: _Node, tenants: Mapping[str, Any],
                       node: NodeConfig) -> tuple[DropFolderConfig, ...]:
    """``dropfolders``: each item, then that no two overlap and none touches relayd's own folders."""
    out: list[tuple[str, DropFolderConfig]] = []
    for ipath, item in ck.list_of("dropfolders", value):
        drop = _parse_dropfolder(ck, ipath, item, tenants)
        if drop is None:
            continue
        folder = str(drop.path)
        for other_path, other in out:
            if _inside(folder, str(other.path)) or _inside(str(other.path), folder):
                ck.err(f"{ipath}.path", f"{folder} overlaps {other_path}.path ({other.path}); drop folders must "
                       "not overlap")
        for key in ("state_dir", "spool_dir"):
            mine = os.path.normpath(getattr(node, key))
            if _inside(folder, mine) or _inside(mine, folder):
                ck.err(f"{ipath}.path", f"{folder} overlaps node.{key} ({mine})")
            if drop.move_to is not None and _inside(str(drop.move_to), mine):
                ck.err(f"{ipath}.after", f"the move target {drop.move_to} is inside node.{key} ({mine})")
        out.append((ipath, drop))
    for ipath, drop in out:
        for other_path, other in out:
            if drop.move_to is not None and other is not drop and _inside(str(drop.move_to), str(other.path)):
                rel = os.path.relpath(drop.move_to, other.path)
                if rel == "." or not any(other.is_temp_name(c) for c in rel.split("/")):
                    ck.err(f"{ipath}.after", f"the move target {drop.move_to} is inside {other_path}.path "
                           f"({other.path}): moved files would be taken again")
    return tuple(d for _, d in out)


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
    integrity = _parse_integrity(ck, top.get("integrity"))
    metrics = _parse_metrics(ck, top.get("metrics"), gateway)
    dest_items = _named_items(ck, "destinations", top.get("destinations"), "destination")
    dest_names = {name for name, _ in dest_items}
    destinations: dict[str, DestinationConfig] = {}
    for dname, draw in dest_items:
        dest = _parse_destination(ck, dname, draw)
        if dest is not None:
            destinations[dname] = dest
    if not integrity.manifests:
        for dname, dest in destinations.items():
            if dest.options.get("sidecar"):
                ck.err(f"destinations.{dname}.sidecar", "needs signed manifests, but integrity.manifests is false")
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
    dropfolders = _parse_dropfolders(ck, top.get("dropfolders"), tenants, node)
    if ck.errors:
        raise ConfigError(ck.errors)
    return Config(node=node, gateway=gateway, tenants=MappingProxyType(tenants),
                  destinations=MappingProxyType(destinations), source=source, integrity=integrity,
                  dropfolders=dropfolders, metrics=metrics)
