"""Pure tests of config parsing and validation (relayd.config): no daemon, no subprocess."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from relayd.config import (
    DEFAULT_PERMISSIONS, DEFAULT_TEMP_PATTERNS, KEYS, REQUIRED, SCHEMA, AlgorithmsConfig, Config, ConfigError,
    DestinationConfig, GatewayConfig, NodeConfig, QuotaConfig, RouteConfig, TenantConfig, UserConfig,
    glob_to_regex, load_config, parse_config, parse_duration, parse_size,
)

ARGON2 = ("$argon2id$v=19$m=65536,t=3,p=4$TncZpg4D2S11u/TvTyHtuQ$"
          "uT1Axx1YoOHhsmvf1QQr4QcGvDbXhWW5Ik+7m40CjcA")
BCRYPT = "$2b$12$.YYF6oevynTKcx6uynAnIeIwfIwwzKzOH7wXmPRz/IxCHvP.MPiga"


def _pub() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519", comment="test@relayd")
    return key.export_public_key().decode().strip()


PUB1, PUB2, CA = _pub(), _pub(), _pub()


def minimal() -> dict[str, Any]:
    """The smallest valid config."""
    return {"node": {"id": "gw1"}}


def full(tmp: Path) -> dict[str, Any]:
    """A config touching most keys; relative paths resolve under ``tmp``."""
    return {
        "node": {"id": "gw-1", "state_dir": "state", "spool_dir": "/srv/spool"},
        "gateway": {
            "listen": ["127.0.0.1:2222", "[::1]:2022", "gw.example.com:22", "*:2200"],
            "login_timeout": "45s", "max_auth_tries": 3, "max_sessions_per_user": 4,
            "max_handles_per_session": 8, "idle_timeout": "1h", "keepalive_interval": 0,
            "drain_timeout": "2m",
            "algorithms": {"ciphers": ["aes256-gcm@openssh.com"], "kex": ["curve25519-sha256"]},
        },
        "tenants": {
            "acme": {
                "quota": {"bytes": "1GiB", "files": 100},
                "max_file_size": "10MB",
                "commit": "rename",
                "temp_patterns": ["*.upload"],
                "cert_authorities": [CA],
                "retention": "1d",
                "users": [
                    {"name": "acme-erp", "authorized_keys": [PUB1], "permissions": ["list", "download"]},
                    {"name": "acme-pw", "password_hash": ARGON2},
                ],
                "routes": [{"match": "in/**/*.csv", "to": ["arch", "peer"]}],
            },
            "globex": {"users": [{"name": "globex-1", "password_hash": BCRYPT, "permissions": "upload"}]},
            "empty": None,
        },
        "destinations": {
            "arch": {"type": "local", "path": "archive/{tenant}", "sidecar": True},
            "peer": {"type": "relayd", "host": "10.0.0.5", "user": "relay", "identity": str(tmp / "id"),
                     "known_hosts": str(tmp / "kh"), "path": "/", "max_age": "2d"},
        },
    }


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A folder with the files ``full`` refers to."""
    (tmp_path / "id").write_text("x")
    (tmp_path / "kh").write_text("x")
    return tmp_path


def errors_of(data: Any, base: Path | None = None) -> list[str]:
    """The error lines ``parse_config`` reports (fails if it accepts the config)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base or Path("/nonexistent-base"))
    assert info.value.exit_code == 2
    assert info.value.errors, "ConfigError without lines"
    for line in info.value.errors:
        assert "\n" not in line and ": " in line, line
    return info.value.errors


def only_error(data: Any, path: str, contains: str = "", base: Path | None = None) -> str:
    """Assert exactly one error, at ``path``; return its problem text."""
    errs = errors_of(data, base)
    assert len(errs) == 1, errs
    key, _, problem = errs[0].partition(": ")
    assert key == path, errs
    assert contains.lower() in problem.lower(), errs
    return problem


# --------------------------------------------------------------------------------------------
# Good configs


def test_full_config_builds_frozen_typed_objects(tmp: Path) -> None:
    cfg = parse_config(full(tmp), base_dir=tmp, source=tmp / "relayd.yaml")
    assert cfg.source == tmp / "relayd.yaml"
    assert cfg.node == NodeConfig(id="gw-1", state_dir=tmp / "state", spool_dir=Path("/srv/spool"))
    gw = cfg.gateway
    assert gw.listen == (("127.0.0.1", 2222), ("::1", 2022), ("gw.example.com", 22), ("0.0.0.0", 2200))
    assert (gw.login_timeout, gw.max_auth_tries, gw.max_sessions_per_user, gw.max_handles_per_session) == \
        (45.0, 3, 4, 8)
    assert (gw.idle_timeout, gw.keepalive_interval, gw.drain_timeout) == (3600.0, 0.0, 120.0)
    assert gw.algorithms.ciphers == ("aes256-gcm@openssh.com",)
    assert gw.algorithms.kex == ("curve25519-sha256",)
    assert gw.algorithms.macs == AlgorithmsConfig().macs
    acme = cfg.tenants["acme"]
    assert acme.quota == QuotaConfig(bytes=1024**3, files=100)
    assert acme.max_file_size == 10_000_000
    assert acme.commit == "rename"
    assert acme.temp_patterns == ("*.upload",)
    assert acme.cert_authorities == (CA,)
    assert acme.retention == 86400.0
    assert acme.routes == (RouteConfig(match="in/**/*.csv", to=("arch", "peer")),)
    erp, pw = acme.users
    assert erp == UserConfig(name="acme-erp", tenant="acme", authorized_keys=(PUB1,),
                             permissions=frozenset({"list", "download"}))
    assert pw.password_hash == ARGON2 and pw.permissions == DEFAULT_PERMISSIONS and pw.authorized_keys == ()
    assert cfg.tenants["globex"].users[0].permissions == frozenset({"upload"})
    assert cfg.tenants["empty"] == TenantConfig(name="empty")
    assert cfg.find_user("globex-1").tenant == "globex"  # type: ignore[union-attr]
    assert cfg.find_user("nobody") is None
    assert cfg.destinations["arch"] == DestinationConfig(
        name="arch", type="local",
        options={"path": str(tmp / "archive/{tenant}"), "sidecar": True, "verify": "sha256", "concurrency": 4,
                 "on_conflict": "overwrite", "retry_initial": 2.0, "retry_max": 300.0})
    peer = cfg.destinations["peer"].options
    assert peer["identity"] == tmp / "id" and peer["max_age"] == 2 * 86400.0
    assert peer["connect_timeout"] == 30.0 and peer["idle_timeout"] == 300.0 and "port" not in peer


def test_config_objects_are_immutable(tmp: Path) -> None:
    cfg = parse_config(full(tmp), base_dir=tmp)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = cfg.node  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tenants["acme"].users[0].name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.tenants["new"] = cfg.tenants["acme"]  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.destinations["arch"].options["path"] = "/"  # type: ignore[index]
    assert isinstance(cfg.tenants["acme"].users, tuple)
    assert isinstance(cfg.tenants["acme"].users[0].permissions, frozenset)


def test_minimal_config_gets_every_default() -> None:
    cfg = parse_config({"node": {"id": "gw1"}, "tenants": {"t": {"users": [{"name": "u", "authorized_keys": PUB1}]}}})
    assert cfg.node == NodeConfig(id="gw1", state_dir=Path("/var/lib/relayd"), spool_dir=Path("/var/spool/relayd"))
    assert cfg.gateway == GatewayConfig()
    assert cfg.gateway.listen == (("0.0.0.0", 2222),)
    t = cfg.tenants["t"]
    assert t == TenantConfig(name="t", users=t.users)
    assert t.commit == "close" and t.temp_patterns == DEFAULT_TEMP_PATTERNS and t.quota == QuotaConfig()
    assert t.users[0].permissions == frozenset({"upload", "list", "mkdir"})
    assert t.users[0].authorized_keys == (PUB1,)
    assert dict(cfg.destinations) == {}


def test_tenant_without_users_is_fine() -> None:
    cfg = parse_config({"node": {"id": "gw1"}, "tenants": {"quiet": {"quota": {"files": 5}}}})
    assert cfg.tenants["quiet"].users == ()


def _concrete(path: str) -> list[str]:
    """Schema path → the keys to walk in a raw dict (``<name>`` → a sample name, ``[]`` → item 0)."""
    return path.replace("[]", ".[]").split(".")


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a schema path in a raw config dict, creating mappings/list items on the way."""
    parts = _concrete(path)
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "<name>":
            part = "acme" if parts[0] == "tenants" else "arch"
        if part == "[]":
            if not cur:
                cur.append({})
            if last:
                cur[0] = value
            cur = cur[0]
            continue
        if last:
            cur[part] = value
        else:
            nxt = parts[i + 1]
            if cur.get(part) is None:
                cur[part] = [] if nxt == "[]" else {}
            cur = cur[part]


def test_explicit_defaults_equal_implicit_defaults(tmp: Path) -> None:
    """Every default in the KEYS registry is what the parser really uses when a key is left out."""
    def base() -> dict[str, Any]:
        return {"node": {"id": "gw1"},
                "tenants": {"acme": {"users": [{"name": "u", "authorized_keys": [PUB1]}],
                                     "routes": [{"match": "**", "to": ["arch"]}]}},
                "destinations": {"arch": {"type": "sftp", "host": "h", "user": "u", "identity": "id",
                                          "known_hosts": "kh", "path": "/"}}}
    implicit = parse_config(base(), base_dir=tmp)
    explicit_raw = base()
    written = 0
    for path, spec in KEYS.items():
        if spec.default is REQUIRED or spec.default is None or spec.default == {} or spec.default == []:
            continue
        if path.startswith("destinations.") and spec.types and "sftp" not in spec.types:
            continue
        _set(explicit_raw, path, spec.default)
        written += 1
    assert written >= 20
    explicit = parse_config(explicit_raw, base_dir=tmp)
    assert explicit == implicit


# --------------------------------------------------------------------------------------------
# The registry and the code use the same key sets


def test_schema_registry_is_consistent() -> None:
    assert set(SCHEMA) == set(KEYS)
    for path, line in SCHEMA.items():
        assert line and "\n" not in line, path
        parent = path.rsplit(".", 1)[0] if "." in path else None
        if parent is not None:
            assert parent.removesuffix("[]") in KEYS, f"{path}: parent {parent} not in KEYS"


def _keys_under(section: str) -> set[str]:
    prefix = section + "."
    return {p[len(prefix):] for p in KEYS if p.startswith(prefix) and "." not in p[len(prefix):]
            and "[]" not in p[len(prefix):]}


@pytest.mark.parametrize("cls, section, extra", [
    (NodeConfig, "node", set()),
    (GatewayConfig, "gateway", set()),
    (AlgorithmsConfig, "gateway.algorithms", set()),
    (QuotaConfig, "tenants.<name>.quota", set()),
    (TenantConfig, "tenants.<name>", {"name"}),
    (UserConfig, "tenants.<name>.users[]", {"tenant"}),
    (RouteConfig, "tenants.<name>.routes[]", set()),
])
def test_dataclass_fields_match_schema(cls: type, section: str, extra: set[str]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - extra == _keys_under(section)


def test_every_destination_key_has_a_converter() -> None:
    from relayd import config

    assert set(config._DEST_CONVERTERS) == _keys_under("destinations.<name>") - {"type"}


def test_unknown_key_is_rejected_with_hint_from_the_registry() -> None:
    for path in [p for p in KEYS if "." in p and not p.startswith("destinations.")]:
        section, key = path.rsplit(".", 1)
        if section in ("tenants", "destinations") or key == "<name>":
            continue
        data = minimal()
        _set(data, f"{section}.{key}X".replace("X", "x"), 1)
        errs = errors_of(data)
        concrete = f"{section}.{key}x".replace("<name>", "acme").replace("[]", "[0]")
        assert any(e.startswith(f"{concrete}: unknown key (did you mean {key!r}?)") for e in errs), (path, errs)


# --------------------------------------------------------------------------------------------
# Sizes and durations


@pytest.mark.parametrize("text, expected", [
    (0, 0), (123, 123), ("123", 123), ("10GiB", 10 * 1024**3), ("10 GiB", 10 * 1024**3), ("5GB", 5 * 10**9),
    ("512k", 512_000), ("512KiB", 524288), ("1.5MiB", 1572864), ("2Ti", 2 * 1024**4), ("1pb", 10**15),
    ("7B", 7), ("1gib", 1024**3),
])
def test_parse_size(text: Any, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [-1, "-1GiB", "10XB", "GiB", "", "1e3", True, 1.5, None, [1], {"a": 1}, "1 0MB"])
def test_parse_size_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("text, expected", [
    (0, 0.0), (30, 30.0), (2.5, 2.5), ("30", 30.0), ("30s", 30.0), ("250ms", 0.25), ("5m", 300.0),
    ("12h", 43200.0), ("7d", 604800.0), ("2w", 1209600.0), ("1.5h", 5400.0), (" 10 s ", 10.0),
])
def test_parse_duration(text: Any, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", [-1, "-5s", "5y", "s", "", True, float("inf"), float("nan"), None, ["1s"], "1h30m"])
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


# --------------------------------------------------------------------------------------------
# One bad value → exactly one error at exactly its key path


def _tenant(**extra: Any) -> dict[str, Any]:
    t = {"users": [{"name": "u1", "authorized_keys": [PUB1]}]}
    t.update(extra)
    return {"node": {"id": "gw1"}, "tenants": {"acme": t}, "destinations": {"arch": {"type": "local", "path": "/a"}}}


def _user(**fields: Any) -> dict[str, Any]:
    return {"node": {"id": "gw1"}, "tenants": {"acme": {"users": [{"name": "u1", **fields}]}}}


def _gw(**fields: Any) -> dict[str, Any]:
    return {"node": {"id": "gw1"}, "gateway": fields}


def _dest(**fields: Any) -> dict[str, Any]:
    return {"node": {"id": "gw1"}, "destinations": {"d": fields}}


BAD_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing node", {"gateway": {}}, "node", "required"),
    ("missing node.id", {"node": {"state_dir": "/x"}}, "node.id", "required"),
    ("bad node id", {"node": {"id": "has space"}}, "node.id", "invalid name"),
    ("node as list", {"node": ["gw1"]}, "node", "expected a mapping"),
    ("unknown top key", {"node": {"id": "g"}, "tenant": {}}, "tenant", "did you mean 'tenants'"),
    ("gateway as string", {"node": {"id": "g"}, "gateway": "x"}, "gateway", "expected a mapping"),
    ("listen no port", _gw(listen=["127.0.0.1"]), "gateway.listen[0]", "missing :PORT"),
    ("listen port 0", _gw(listen=["127.0.0.1:0"]), "gateway.listen[0]", "1-65535"),
    ("listen port big", _gw(listen=["127.0.0.1:70000"]), "gateway.listen[0]", "1-65535"),
    ("listen bad ipv4", _gw(listen=["300.1.1.1:22"]), "gateway.listen[0]", "not an IPv4 address"),
    ("listen bare ipv6", _gw(listen=["::1:22"]), "gateway.listen[0]", "brackets"),
    ("listen bad ipv6", _gw(listen=["[zz::1]:22"]), "gateway.listen[0]", "not an IPv6"),
    ("listen bad host", _gw(listen=["bad_host!:22"]), "gateway.listen[0]", "host name"),
    ("listen number", _gw(listen=[2222]), "gateway.listen[0]", "expected a non-empty string"),
    ("listen empty", _gw(listen=[]), "gateway.listen", "at least one"),
    ("listen duplicate", _gw(listen=["127.0.0.1:22", "127.0.0.1:22"]), "gateway.listen[1]", "duplicate"),
    ("listen single bad string", _gw(listen="nope"), "gateway.listen", "missing :PORT"),
    ("host key missing", _gw(host_keys=["/nonexistent/key"]), "gateway.host_keys[0]", "file not found"),
    ("login_timeout zero", _gw(login_timeout=0), "gateway.login_timeout", "greater than 0"),
    ("login_timeout junk", _gw(login_timeout="soon"), "gateway.login_timeout", "duration"),
    ("idle negative", _gw(idle_timeout="-1s"), "gateway.idle_timeout", "negative"),
    ("max_auth_tries zero", _gw(max_auth_tries=0), "gateway.max_auth_tries", "at least 1"),
    ("max_auth_tries bool", _gw(max_auth_tries=True), "gateway.max_auth_tries", "integer"),
    ("max_auth_tries str", _gw(max_auth_tries="6"), "gateway.max_auth_tries", "integer"),
    ("handles negative", _gw(max_handles_per_session=-3), "gateway.max_handles_per_session", "at least 1"),
    ("algorithm unknown", _gw(algorithms={"ciphers": ["aes128-gcm"]}), "gateway.algorithms.ciphers[0]",
     "unsupported"),
    ("algorithm empty", _gw(algorithms={"macs": []}), "gateway.algorithms.macs", "at least one"),
    ("algorithm kind unknown", _gw(algorithms={"cipher": ["x"]}), "gateway.algorithms.cipher",
     "did you mean 'ciphers'"),
    ("tenants as list", {"node": {"id": "g"}, "tenants": ["acme"]}, "tenants", "expected a mapping"),
    ("tenant name number", {"node": {"id": "g"}, "tenants": {5: {}}}, "tenants.5", "must be strings"),
    ("tenant bad name", {"node": {"id": "g"}, "tenants": {"a/b": {}}}, "tenants.a/b", "invalid tenant name"),
    ("tenant as list", {"node": {"id": "g"}, "tenants": {"acme": []}}, "tenants.acme", "expected a mapping"),
    ("quota bytes zero", _tenant(quota={"bytes": 0}), "tenants.acme.quota.bytes", "greater than 0"),
    ("quota bytes neg", _tenant(quota={"bytes": -5}), "tenants.acme.quota.bytes", "negative"),
    ("quota bytes junk", _tenant(quota={"bytes": "lots"}), "tenants.acme.quota.bytes", "size"),
    ("quota files zero", _tenant(quota={"files": 0}), "tenants.acme.quota.files", "at least 1"),
    ("quota files str", _tenant(quota={"files": "10"}), "tenants.acme.quota.files", "integer"),
    ("quota unknown", _tenant(quota={"byte": 1}), "tenants.acme.quota.byte", "did you mean 'bytes'"),
    ("max_file_size zero", _tenant(max_file_size="0B"), "tenants.acme.max_file_size", "greater than 0"),
    ("commit bad", _tenant(commit="flush"), "tenants.acme.commit", "'close' or 'rename'"),
    ("commit list", _tenant(commit=["close"]), "tenants.acme.commit", "'close' or 'rename'"),
    ("temp pattern path", _tenant(temp_patterns=["tmp/*"]), "tenants.acme.temp_patterns[0]", "file name"),
    ("temp pattern mapping", _tenant(temp_patterns={"a": 1}), "tenants.acme.temp_patterns", "list of strings"),
    ("ca with options", _tenant(cert_authorities=[f"cert-authority {CA}"]), "tenants.acme.cert_authorities[0]",
     "bare CA"),
    ("ca garbage", _tenant(cert_authorities=["ssh-ed25519 AAAA"]), "tenants.acme.cert_authorities[0]",
     "not a valid"),
    ("retention junk", _tenant(retention="forever"), "tenants.acme.retention", "duration"),
    ("users mapping", _tenant(users={"name": "u"}), "tenants.acme.users", "expected a list"),
    ("user scalar", _tenant(users=["u1"]), "tenants.acme.users[0]", "expected a mapping"),
    ("user no name", _tenant(users=[{"authorized_keys": [PUB1]}]), "tenants.acme.users[0].name", "required"),
    ("user bad name", _user(name="a b", authorized_keys=[PUB1]), "tenants.acme.users[0].name", "invalid name"),
    ("user name list", _user(name=["x"], authorized_keys=[PUB1]), "tenants.acme.users[0].name",
     "non-empty string"),
    ("user no credential", _user(), "tenants.acme.users[0]", "could never log in"),
    ("plaintext password", _user(password="hunter2", authorized_keys=[PUB1]), "tenants.acme.users[0].password",
     "plaintext"),
    ("password_hash plaintext", _user(password_hash="hunter2"), "tenants.acme.users[0].password_hash",
     "plaintext"),
    ("password_hash argon2i", _user(password_hash="$argon2i$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"),
     "tenants.acme.users[0].password_hash", "argon2id"),
    ("password_hash broken argon2id", _user(password_hash="$argon2id$garbage"),
     "tenants.acme.users[0].password_hash", "malformed"),
    ("password_hash broken bcrypt", _user(password_hash="$2b$12$short"),
     "tenants.acme.users[0].password_hash", "malformed bcrypt"),
    ("password_hash number", _user(password_hash=1234), "tenants.acme.users[0].password_hash", "string"),
    ("key invalid", _user(authorized_keys=["ssh-ed25519 AAAAnotakey"]), "tenants.acme.users[0].authorized_keys[0]",
     "not a valid OpenSSH public key"),
    ("key is private", _user(authorized_keys=["-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"]),
     "tenants.acme.users[0].authorized_keys[0]", "private key"),
    ("key multi-line", _user(authorized_keys=[f"{PUB1}\n{PUB2}"]), "tenants.acme.users[0].authorized_keys[0]",
     "one key per"),
    ("key number", _user(authorized_keys=[PUB1, 7]), "tenants.acme.users[0].authorized_keys[1]", "string"),
    ("keys file missing", _user(authorized_keys_file="/nonexistent/keys"),
     "tenants.acme.users[0].authorized_keys_file", "file not found: /nonexistent/keys"),
    ("permission unknown", _user(authorized_keys=[PUB1], permissions=["list", "uplaod"]),
     "tenants.acme.users[0].permissions[1]", "did you mean 'upload'"),
    ("permission mapping", _user(authorized_keys=[PUB1], permissions={"list": True}),
     "tenants.acme.users[0].permissions", "list of strings"),
    ("routes mapping", _tenant(routes={"match": "*"}), "tenants.acme.routes", "expected a list"),
    ("route no match", _tenant(routes=[{"to": ["arch"]}]), "tenants.acme.routes[0].match", "required"),
    ("route no to", _tenant(routes=[{"match": "*"}]), "tenants.acme.routes[0].to", "required"),
    ("route empty to", _tenant(routes=[{"match": "*", "to": []}]), "tenants.acme.routes[0].to", "at least one"),
    ("route unknown dest", _tenant(routes=[{"match": "*", "to": ["arhc"]}]), "tenants.acme.routes[0].to[0]",
     "did you mean 'arch'"),
    ("route bad glob", _tenant(routes=[{"match": "a/[bc", "to": ["arch"]}]), "tenants.acme.routes[0].match",
     "unclosed"),
    ("route glob **x", _tenant(routes=[{"match": "a/**x", "to": ["arch"]}]), "tenants.acme.routes[0].match",
     "whole path segment"),
    ("route glob ..", _tenant(routes=[{"match": "../*", "to": ["arch"]}]), "tenants.acme.routes[0].match",
     "'..'"),
    ("route unknown key", _tenant(routes=[{"match": "*", "to": ["arch"], "too": 1}]),
     "tenants.acme.routes[0].too", "did you mean 'to'"),
    ("destinations list", {"node": {"id": "g"}, "destinations": [{"type": "local"}]}, "destinations",
     "expected a mapping"),
    ("destination scalar", _dest() | {"destinations": {"d": "local"}}, "destinations.d", "expected a mapping"),
    ("destination no type", _dest(path="/x"), "destinations.d.type", "required"),
    ("destination bad type", _dest(type="s3", path="/x"), "destinations.d.type", "one of local, sftp, relayd"),
    ("destination list type", _dest(type=["local"], path="/x"), "destinations.d.type", "one of"),
    ("destination no path", _dest(type="local"), "destinations.d.path", "required"),
    ("destination key of other type", _dest(type="local", path="/x", block_size="1MiB"),
     "destinations.d.block_size", "only by type sftp"),
    ("destination unknown key", _dest(type="local", path="/x", concurency=2), "destinations.d.concurency",
     "did you mean 'concurrency'"),
    ("destination bad concurrency", _dest(type="local", path="/x", concurrency=0), "destinations.d.concurrency",
     "at least 1"),
    ("destination verify str", _dest(type="local", path="/x", verify="yes please"), "destinations.d.verify",
     "must be one of sha256, size"),
    ("destination on_conflict", _dest(type="local", path="/x", on_conflict="skip"), "destinations.d.on_conflict",
     "must be one of overwrite, rename, fail"),
    ("destination hmac missing", _dest(type="local", path="/x", hmac_key_file="/nonexistent/k"),
     "destinations.d.hmac_key_file", "file not found"),
    ("destination bad name", {"node": {"id": "g"}, "destinations": {"-x": {"type": "local", "path": "/"}}},
     "destinations.-x", "invalid destination name"),
]


@pytest.mark.parametrize("data, path, contains", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_value_is_reported_at_its_key_path(data: dict[str, Any], path: str, contains: str) -> None:
    only_error(copy.deepcopy(data), path, contains)


def test_remote_destination_requires_connection_keys_and_checks_values(tmp: Path) -> None:
    errs = errors_of({"node": {"id": "g"}, "destinations": {"r": {"type": "sftp", "path": "/", "port": 0,
                                                                  "host": "bad host", "max_age": 0}}}, tmp)
    assert sorted(e.split(":")[0] for e in errs) == sorted([
        "destinations.r.host", "destinations.r.identity", "destinations.r.known_hosts", "destinations.r.user",
        "destinations.r.port", "destinations.r.max_age"])


def test_multiple_errors_are_all_reported() -> None:
    data = {
        "node": {"id": "gw 1"},
        "gateway": {"listen": ["x"], "max_auth_tries": 0, "bogus": 1},
        "tenants": {
            "acme": {"commit": "never", "users": [{"name": "u1", "password": "p"}, {"name": "u2"}]},
        },
    }
    paths = [e.split(": ")[0] for e in errors_of(data)]
    assert sorted(paths) == sorted([
        "node.id", "gateway.bogus", "gateway.listen[0]", "gateway.max_auth_tries", "tenants.acme.commit",
        "tenants.acme.users[0].password", "tenants.acme.users[0]", "tenants.acme.users[1]",
    ])


def test_duplicate_user_names_across_and_within_tenants() -> None:
    data = {"node": {"id": "g"}, "tenants": {
        "acme": {"users": [{"name": "bob", "authorized_keys": [PUB1]}, {"name": "bob", "authorized_keys": [PUB2]}]},
        "globex": {"users": [{"name": "x", "authorized_keys": PUB1}, {"name": "bob", "password_hash": BCRYPT}]},
    }}
    errs = errors_of(data)
    assert errs == [
        "tenants.acme.users[1].name: user 'bob' is already defined in this tenant; login names are global",
        "tenants.globex.users[1].name: user 'bob' is already defined in tenant 'acme'; login names are global",
    ]


def test_duplicate_user_index_counts_invalid_entries() -> None:
    """The reported index is the item's position in the YAML list, even after a broken entry."""
    data = {"node": {"id": "g"}, "tenants": {
        "a": {"users": [{"name": "bob", "authorized_keys": [PUB1]}]},
        "b": {"users": ["junk", {"name": "bob", "authorized_keys": [PUB2]}]},
    }}
    assert [e.split(": ")[0] for e in errors_of(data)] == ["tenants.b.users[0]", "tenants.b.users[1].name"]


def test_password_values_are_never_echoed() -> None:
    for user in ({"password": "s3cret-pw"}, {"password_hash": "s3cret-pw"}):
        for line in errors_of(_user(**user)):
            assert "s3cret-pw" not in line


def test_plaintext_password_refused_even_with_valid_hash() -> None:
    only_error(_user(password="pw", password_hash=ARGON2), "tenants.acme.users[0].password", "plaintext")


def test_listen_forms() -> None:
    cfg = parse_config(_gw(listen=["0.0.0.0:22", "[::]:22", "[fe80::1%eth0]:22", "localhost:2222",
                                   ":2223", "relay-1.example.org:2224", "gw.local.:2225"]))
    assert cfg.gateway.listen == (("0.0.0.0", 22), ("::", 22), ("fe80::1%eth0", 22), ("localhost", 2222),
                                  ("0.0.0.0", 2223), ("relay-1.example.org", 2224), ("gw.local.", 2225))
    assert parse_config(_gw(listen="127.0.0.1:2222")).gateway.listen == (("127.0.0.1", 2222),)


def test_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "hk").write_bytes(key.export_private_key())
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "u.pub").write_text(f"# comment\n\n{PUB1}\n{PUB2}\n")
    data = _user(authorized_keys_file="keys/u.pub")
    data["gateway"] = {"host_keys": ["hk"]}
    data["node"]["state_dir"] = "st"
    cfg = parse_config(data, base_dir=tmp_path)
    user = cfg.tenants["acme"].users[0]
    assert user.authorized_keys_file == tmp_path / "keys" / "u.pub"
    assert user.authorized_keys == (PUB1, PUB2)
    assert cfg.gateway.host_keys == (tmp_path / "hk",)
    assert cfg.node.state_dir == tmp_path / "st"


def test_host_key_that_is_not_a_private_key(tmp_path: Path) -> None:
    (tmp_path / "hk.pub").write_text(PUB1 + "\n")
    only_error(_gw(host_keys=["hk.pub"]), "gateway.host_keys[0]", "not a usable private host key", tmp_path)
    only_error(_gw(host_keys=[str(tmp_path)]), "gateway.host_keys[0]", "is a directory", tmp_path)


def test_authorized_keys_file_problems_name_the_key(tmp_path: Path) -> None:
    k = "tenants.acme.users[0].authorized_keys_file"
    only_error(_user(authorized_keys_file=str(tmp_path)), k, "is a directory", tmp_path)
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00junk")
    only_error(_user(authorized_keys_file="bin"), k, "not UTF-8", tmp_path)
    (tmp_path / "bad").write_text(f"{PUB1}\nssh-ed25519 AAAAbroken\n")
    assert "bad line 2: not a valid OpenSSH public key" in only_error(_user(authorized_keys_file="bad"), k,
                                                                      base=tmp_path)
    (tmp_path / "empty").write_text("# nobody yet\n")
    only_error(_user(authorized_keys_file="empty"), k, "has no keys", tmp_path)
    only_error(_user(authorized_keys_file="~nosuchuser-relayd/keys"), k, "cannot expand", tmp_path)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    only_error({"node": {"id": "g", "spool_dir": "f"}}, "node.spool_dir", "not a directory", tmp_path)


@pytest.mark.parametrize("top", [[], ["node"], "node: x", 42, True, None])
def test_top_level_must_be_a_mapping(top: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(top, source=Path("/etc/relayd/relayd.yaml"))
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("/etc/relayd/relayd.yaml: expected a mapping")


_WEIRD: list[Any] = [[["nested"]], {"x": [1]}, True, 3.5]


@pytest.mark.parametrize("path", [p for p in KEYS if p not in ("tenants.<name>", "destinations.<name>")])
@pytest.mark.parametrize("weird", _WEIRD, ids=["list-of-list", "mapping", "bool", "float"])
def test_weird_types_at_every_key_give_errors_not_exceptions(path: str, weird: Any, tmp: Path) -> None:
    spec = KEYS[path]
    if isinstance(weird, bool) and spec.type == "boolean":
        return
    if isinstance(weird, float) and spec.type == "duration":
        return
    data = full(tmp)
    _set(data, path, weird)
    errs = errors_of(data, tmp)
    concrete = path.replace("tenants.<name>", "tenants.acme").replace("destinations.<name>", "destinations.arch") \
        .replace("[]", "[0]")
    assert any(e.startswith(concrete) for e in errs), (path, errs)


# --------------------------------------------------------------------------------------------
# Route globs


@pytest.mark.parametrize("pattern, path, hit", [
    ("**", "/a.csv", True), ("**", "/x/y/z", True),
    ("*.csv", "/a.csv", True), ("*.csv", "/in/a.csv", False),
    ("**/*.csv", "/a.csv", True), ("**/*.csv", "/in/deep/a.csv", True), ("**/*.csv", "/a.csv.part", False),
    ("in/**", "/in/a", True), ("in/**", "/in/x/y", True), ("in/**", "/out/a", False), ("in/**", "/in", False),
    ("in/**/*.pdf", "/in/2024/01/x.pdf", True), ("in/*.pdf", "/in/2024/x.pdf", False),
    ("/in/?.txt", "in/a.txt", True), ("in/?.txt", "/in/ab.txt", False),
    ("[ab]*.csv", "/a1.csv", True), ("[!ab]*.csv", "/a1.csv", False), ("[!ab]*.csv", "/c1.csv", True),
    ("x[0-9].dat", "/x7.dat", True), ("x[]].dat", "/x].dat", True), ("a+b(c).txt", "/a+b(c).txt", True),
    ("a*", "/a/b", False),
])
def test_route_glob_semantics(pattern: str, path: str, hit: bool) -> None:
    assert RouteConfig(match=pattern, to=("d",)).matches(path) is hit


@pytest.mark.parametrize("bad", ["", "/", "a//b", "a/**b", "**x/y", "a/./b", "../a", "[", "a[!]", "x\0y", "[z-a]"])
def test_route_glob_invalid(bad: str) -> None:
    with pytest.raises(ValueError):
        glob_to_regex(bad)


def test_temp_pattern_matching() -> None:
    t = TenantConfig(name="t")
    assert t.is_temp_name("x.part") and t.is_temp_name("x.filepart") and not t.is_temp_name("x.csv")


# --------------------------------------------------------------------------------------------
# load_config: files and YAML


def _write(tmp_path: Path, text: str | bytes, name: str = "relayd.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _load_error(p: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


def test_load_config_good(tmp_path: Path) -> None:
    p = _write(tmp_path, f"node: {{id: gw1, state_dir: st}}\ntenants:\n  a:\n    users:\n"
                         f"      - name: u\n        authorized_keys: ['{PUB1}']\n")
    cfg = load_config(p)
    assert isinstance(cfg, Config)
    assert cfg.source == p.resolve()
    assert cfg.node.state_dir == tmp_path.resolve() / "st"


def test_load_config_missing_file(tmp_path: Path) -> None:
    line = _load_error(tmp_path / "nope.yaml")
    assert line == f"{tmp_path / 'nope.yaml'}: cannot read config: No such file or directory"


def test_load_config_directory(tmp_path: Path) -> None:
    assert "is a directory" in _load_error(tmp_path)


def test_load_config_empty(tmp_path: Path) -> None:
    assert _load_error(_write(tmp_path, "# nothing\n")).endswith(": config is empty")


def test_load_config_not_utf8(tmp_path: Path) -> None:
    assert "not UTF-8" in _load_error(_write(tmp_path, b"node: {id: \xff}\n"))


@pytest.mark.parametrize("text, line, column", [
    ("node:\n  id: gw1\n bad: indent\n", 3, 2),
    ("node: {id: gw1\n", 2, 1),
    ("node:\n  id: gw1\n  id: gw2\n", 3, 3),
    ("node: [a, b\ngateway: {}\n", 2, 8),
    ("a: 'unterminated\n", 2, 1),
    ("node: !!python/object:os.system {}\n", 1, 7),
])
def test_load_config_invalid_yaml_names_line_and_column(tmp_path: Path, text: str, line: int, column: int) -> None:
    err = _load_error(_write(tmp_path, text))
    assert re.match(rf"^{re.escape(str(tmp_path / 'relayd.yaml'))}: line {line}, column {column}: invalid YAML: ",
                    err), err


def test_load_config_duplicate_key_message(tmp_path: Path) -> None:
    assert "duplicate key 'id'" in _load_error(_write(tmp_path, "node:\n  id: a\n  id: b\n"))


def test_load_config_top_level_list(tmp_path: Path) -> None:
    p = _write(tmp_path, "- node\n- gateway\n")
    assert _load_error(p) == (f"{p.resolve()}: expected a mapping with the sections node, gateway, tenants and "
                              "destinations at the top level, got a list")


def test_load_config_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    _load_error(_write(tmp_path, "node: " + "[" * 20000 + "]" * 20000 + "\n"))


def test_load_config_multiple_documents(tmp_path: Path) -> None:
    assert "invalid YAML" in _load_error(_write(tmp_path, "node: {id: a}\n---\nnode: {id: b}\n"))


def test_config_error_message_joins_lines() -> None:
    exc = ConfigError(["a: x", "b: y"])
    assert str(exc) == "a: x\nb: y" and exc.exit_code == 2


def test_keys_registry_summary_mentions_defaults() -> None:
    assert "default: 30s" in SCHEMA["gateway.login_timeout"]
    assert "required" in SCHEMA["node.id"]
    assert "default: [*.tmp, *.part, *.filepart]" in SCHEMA["tenants.<name>.temp_patterns"]
    assert "required for type sftp, relayd" in SCHEMA["destinations.<name>.host"]



def test_certificate_only_user_is_fine_when_the_tenant_has_a_ca() -> None:
    data = {"node": {"id": "g"}, "tenants": {"acme": {"cert_authorities": [CA], "users": [{"name": "c"}]}}}
    user = parse_config(data).tenants["acme"].users[0]
    assert user.authorized_keys == () and user.password_hash is None
    data["tenants"]["acme"]["cert_authorities"] = []
    only_error(data, "tenants.acme.users[0]", "could never log in")


def test_sidecar_needs_manifests(tmp_path: Path) -> None:
    raw = {"node": {"id": "g", "state_dir": str(tmp_path / "s"), "spool_dir": str(tmp_path / "p")},
           "integrity": {"manifests": False, "digests": ["blake2b"]},
           "destinations": {"out": {"type": "local", "path": str(tmp_path / "o"), "sidecar": True}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.errors == ["destinations.out.sidecar: needs signed manifests, but integrity.manifests is false"]


def test_integrity_digests_checked(tmp_path: Path) -> None:
    raw = {"node": {"id": "g", "state_dir": str(tmp_path / "s"), "spool_dir": str(tmp_path / "p")},
           "integrity": {"digests": ["sha3-256", "md5"]}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith("integrity.digests[1]: unknown digest 'md5'")
    raw["integrity"] = {"digests": ["sha3-256", "blake2b"]}
    assert parse_config(raw).integrity.digests == ("sha3-256", "blake2b")


def test_extra_digest_names_match_the_implementation() -> None:
    from relayd.config.schema import EXTRA_DIGEST_NAMES
    from relayd.integrity.manifest import EXTRA_DIGESTS
    assert set(EXTRA_DIGEST_NAMES) == set(EXTRA_DIGESTS)
