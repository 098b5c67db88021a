"""Shared fixtures: keys, a two-tenant config, a running daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import Daemon, Key, base_config, free_port, make_key, run_daemon

ALL_PERMS = ["list", "download", "upload", "overwrite", "delete", "rename", "mkdir"]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    """User keys generated once per test session."""
    d = tmp_path_factory.mktemp("keys")
    return {name: make_key(d, name) for name in ("acme", "acme2", "globex", "stranger")}


def two_tenants(keys: dict[str, Key], **acme_extra: Any) -> dict[str, Any]:
    """Tenants ``acme`` (users acme-erp with all permissions, acme-drop with defaults) and ``globex``."""
    return {
        "acme": {
            "users": [
                {"name": "acme-erp", "authorized_keys": [keys["acme"].pub], "permissions": ALL_PERMS},
                {"name": "acme-drop", "authorized_keys": [keys["acme2"].pub]},
            ],
            **acme_extra,
        },
        "globex": {
            "users": [{"name": "globex-1", "authorized_keys": [keys["globex"].pub], "permissions": ALL_PERMS}],
        },
    }


@pytest.fixture
def daemon(tmp_path: Path, keys: dict[str, Key]) -> Iterator[Daemon]:
    """A relayd with two tenants on a free loopback port."""
    port = free_port()
    with run_daemon(tmp_path, base_config(tmp_path, port, two_tenants(keys))) as d:
        yield d
