"""Fixtures for the destination contract suite: a throwaway OpenSSH sshd as the remote cloud.

:class:`DestEnv` hides the kind: ``env.make(**options)`` builds a destination (local, or sftp to
the throwaway sshd on 127.0.0.1) whose ``path`` template points into ``env.root``, a directory on
this host in both cases, so tests check results with plain file operations.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Coroutine, Iterator, TypeVar

import pytest

from relayd.config.model import DestinationConfig
from relayd.relay.destinations import Destination, Payload, create_destination
from tests.helpers import Key, make_file, make_key, sha256_file
from tests.sshd import ThrowawaySshd, throwaway_sshd

T = TypeVar("T")
KINDS = ["local", "sftp"]
RUN_TIMEOUT = 60.0
_ids = itertools.count(1)


def run(coro: Coroutine[Any, Any, T], timeout: float = RUN_TIMEOUT) -> T:
    """Run ``coro`` in a fresh event loop with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Remote:
    """The throwaway sshd and the key that logs in to it."""

    sshd: ThrowawaySshd
    key: Key


@pytest.fixture(scope="session")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """One throwaway sshd for the whole session (deliveries go to per-test directories)."""
    work = tmp_path_factory.mktemp("remote")
    key = make_key(work / "keys", "relay")
    with throwaway_sshd(work / "sshd", authorized_keys=[key.pub]) as srv:
        yield Remote(srv, key)


@pytest.fixture(scope="session")
def sftp_only_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """A throwaway sshd that allows SFTP only (``ForceCommand internal-sftp``): exec is refused."""
    work = tmp_path_factory.mktemp("sftp-only")
    key = make_key(work / "keys", "relay")
    with throwaway_sshd(work / "sshd", authorized_keys=[key.pub]) as srv:
        listening = srv.log().count("Server listening")
        with open(srv.config_path, "a") as f:
            f.write("ForceCommand internal-sftp\n")
        os.kill(srv.proc.pid, signal.SIGHUP)  # sshd re-executes itself with the new config
        deadline = time.monotonic() + 15
        while srv.log().count("Server listening") <= listening:
            assert srv.proc.poll() is None and time.monotonic() < deadline, srv.log()
            time.sleep(0.02)
        yield Remote(srv, key)


def impostor_known_hosts(remote: Remote, tmp_path: Path) -> Path:
    """A known_hosts file pinning some other key for ``remote``'s sshd (a changed host key)."""
    srv = remote.sshd
    kind, blob = make_key(tmp_path / "other", "impostor").pub.split()[:2]
    wrong = tmp_path / "known_hosts.wrong"
    wrong.write_text(f"[{srv.host}]:{srv.port} {kind} {blob}\n")
    return wrong


@dataclass
class DestEnv:
    """One test's view of a destination kind."""

    kind: str
    tmp: Path
    root: Path
    remote: Remote | None

    def config(self, name: str = "dst", path: str | None = None, **options: Any) -> DestinationConfig:
        """A validated-looking DestinationConfig (schema defaults filled like the loader does)."""
        opts: dict[str, Any] = {"path": path if path is not None else str(self.root), "concurrency": 4,
                                "verify": True}
        if self.kind == "sftp":
            assert self.remote is not None
            srv = self.remote.sshd
            opts.update(host=srv.host, port=srv.port, user=srv.user, identity=self.remote.key.path,
                        known_hosts=srv.known_hosts_path, connect_timeout=10.0, idle_timeout=300.0,
                        block_size=256 * 1024, requests=64)
        opts.update(options)
        return DestinationConfig(name=name, type=self.kind, options=MappingProxyType(opts))

    def make(self, **options: Any) -> Destination:
        """A destination of this kind."""
        return create_destination(self.config(**options))

    def payload(self, path: str = "/in/data.csv", size: int = 100_000, seed: int = 0,
                delivery_id: str | None = None, tenant: str = "acme", user: str = "acme-erp",
                received_at: str = "2026-12-03T17:00:00.123456Z") -> Payload:
        """A committed spool object with a fresh delivery id (unless given)."""
        n = next(_ids)
        spool = self.tmp / "spool"
        spool.mkdir(exist_ok=True)
        source = make_file(spool / f"obj-{n}", size, seed=seed)
        digest = sha256_file(source)
        return Payload(delivery_id=delivery_id or f"d{n:04d}", transfer_id=f"t{n:04d}", tenant=tenant,
                       user=user, path=path, source=source, size=size, sha256=digest,
                       received_at=received_at)


@pytest.fixture(params=KINDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> DestEnv:
    """The destination environment, once per kind."""
    root = tmp_path / "dest"
    root.mkdir()
    remote = request.getfixturevalue("remote") if request.param == "sftp" else None
    return DestEnv(kind=request.param, tmp=tmp_path, root=root, remote=remote)
