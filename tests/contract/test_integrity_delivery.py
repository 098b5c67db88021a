"""Integrity at the far end, for every destination kind: sidecars and a remote that corrupts data.

* ``sidecar``: ``<name>.relayd.json`` is published after the data file, atomically, next to the
  name the data was published under; a re-delivery that finds the data already there still
  writes a missing sidecar.
* A store that corrupts the temp file between upload and rename (a test hook around the real
  store) never gets a file published: the SHA-256 check fails, the temp is deleted, the error is
  retryable; through the scheduler the delivery ends ``delivered`` only once the data is right.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from relayd.config import parse_config
from relayd.integrity import KeyRing, Notary
from relayd.integrity.manifest import sidecar_bytes, verify_document, verify_file
from relayd.journal import Journal
from relayd.relay.destinations import DestinationError, Payload, create_destination
from relayd.relay.destinations.base import publish, temp_name
from relayd.relay.scheduler import Relay, RetryPolicy
from relayd.spool import CommitRequest, Spool
from tests.contract.conftest import DestEnv, run


def sign_payload(env: DestEnv, payload: Payload, hmac_key: bytes | None = None) -> tuple[Payload, KeyRing]:
    """The payload with a real signed sidecar document."""
    ring = KeyRing.open(env.tmp / "state")
    signed = Notary(ring, "gw-test").sign(transfer_id=payload.transfer_id, tenant=payload.tenant,
                                          user=payload.user, path=payload.path, size=payload.size,
                                          digests={"sha256": payload.sha256}, received_at=payload.received_at,
                                          source="192.0.2.1:5000")
    return Payload(**{**payload.__dict__, "sidecar": sidecar_bytes(signed, hmac_key)}), ring


def deliver(env: DestEnv, payload: Payload, **options: Any) -> Any:
    async def body() -> Any:
        dest = env.make(**options)
        try:
            return await dest.deliver(payload)
        finally:
            await dest.close()
    return run(body())


def test_sidecar_published_next_to_the_file_and_verifies(env: DestEnv) -> None:
    payload, ring = sign_payload(env, env.payload("/in/report.csv", size=70_000, seed=3), hmac_key=b"s3cret")
    out = deliver(env, payload)
    data = env.root / "in" / "report.csv"
    side = env.root / "in" / "report.csv.relayd.json"
    assert out.remote_path.endswith("/in/report.csv")
    assert side.read_bytes() == payload.sidecar
    manifest = verify_document(side.read_bytes(), ring.public_keys(), hmac_key=b"s3cret")
    assert verify_file(data, manifest) == payload.sha256
    assert manifest["transfer_id"] == payload.transfer_id and manifest["gateway"] == "gw-test"
    assert not list(env.root.rglob("*.part"))
    # The data file is older than (or as old as) its sidecar: it was renamed into place first.
    assert data.stat().st_mtime_ns <= side.stat().st_mtime_ns


def test_sidecar_follows_the_keep_both_name(env: DestEnv) -> None:
    (env.root / "in").mkdir()
    (env.root / "in" / "a.csv").write_bytes(b"someone else's file")
    payload, _ = sign_payload(env, env.payload("/in/a.csv", size=5000, seed=4))
    out = deliver(env, payload, on_conflict="rename")
    assert out.remote_path != str(env.root / "in" / "a.csv")
    assert Path(out.remote_path + ".relayd.json").read_bytes() == payload.sidecar
    assert not (env.root / "in" / "a.csv.relayd.json").exists()


def test_redelivery_writes_a_missing_sidecar_without_resending(env: DestEnv) -> None:
    payload, _ = sign_payload(env, env.payload("/in/b.bin", size=40_000, seed=5))
    deliver(env, payload)
    side = env.root / "in" / "b.bin.relayd.json"
    side.unlink()  # as if the gateway crashed between the two renames
    again = Payload(**{**payload.__dict__, "fresh": False})
    out = deliver(env, again)
    assert out.bytes_sent == 0
    assert side.read_bytes() == payload.sidecar


class CorruptingStore:
    """Wraps a real store; flips a byte of the temp file after each upload while ``corrupt`` > 0."""

    def __init__(self, inner: Any, corrupt: int) -> None:
        self.inner = inner
        self.corrupt = corrupt

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def upload(self, temp: str, source: Path, offset: int, size: int) -> int:
        sent = await self.inner.upload(temp, source, offset, size)
        if self.corrupt > 0:
            self.corrupt -= 1
            with open(temp, "r+b") as f:  # the remote's file system is this host's
                f.seek(size // 2)
                byte = f.read(1)
                f.seek(size // 2)
                f.write(bytes([byte[0] ^ 0xFF]))
        return sent


def test_corrupted_upload_is_never_published(env: DestEnv) -> None:
    payload = env.payload("/in/c.bin", size=300_000, seed=6)
    final = str(env.root / "in" / "c.bin")

    async def body() -> None:
        dest: Any = create_destination(env.config())
        try:
            if env.kind == "local":
                store = CorruptingStore(dest._store, corrupt=1)
                with pytest.raises(DestinationError) as info:
                    await publish(store, payload, final, verify="sha256", on_conflict="overwrite")
            else:
                async with dest.pool.connection() as conn:
                    from relayd.relay.destinations.sftp import SftpStore
                    store = CorruptingStore(SftpStore(conn, 261120, 16, dest.digests, payload.size), corrupt=1)
                    with pytest.raises(DestinationError) as info:
                        await publish(store, payload, final, verify="sha256", on_conflict="overwrite")
            assert info.value.retryable and "sha256 mismatch" in str(info.value)
        finally:
            await dest.close()

    run(body())
    assert not Path(final).exists()
    assert not Path(temp_name(final, payload.delivery_id)).exists()


def test_scheduler_never_marks_a_corrupted_delivery_delivered(tmp_path: Path) -> None:
    """Two corrupted attempts, then a clean one: retry_wait twice, delivered once, right bytes."""
    archive = tmp_path / "archive"
    cfg = parse_config({
        "node": {"id": "gw-test", "state_dir": str(tmp_path / "state"), "spool_dir": str(tmp_path / "spool")},
        "gateway": {"listen": ["127.0.0.1:1"]},
        "tenants": {"acme": {"users": [{"name": "u1", "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"}], "routes": [
            {"match": "**", "to": ["archive"]}]}},
        "destinations": {"archive": {"type": "local", "path": str(archive), "retry_initial": "50ms"}},
    }, base_dir=tmp_path)
    journal = Journal.open(tmp_path / "journal.db")
    ring = KeyRing.open(tmp_path / "state")
    spool = Spool(tmp_path / "spool", journal, Notary(ring, "gw-test"))
    spool.ensure_tenant("acme")
    staging, fd = spool.new_staging("acme")
    data = bytes(range(256)) * 4000
    import os
    os.write(fd, data)
    target = spool.dirs("acme").inbox / "x.bin"
    t = spool.commit(CommitRequest(tenant="acme", user="u1", source="192.0.2.7:1234", path="/x.bin", src=staging,
                                   publish_to=target, size=len(data), fd=fd, destinations=("archive",)))
    os.close(fd)
    stores: list[CorruptingStore] = []

    def factory(dc: Any) -> Any:
        dest = create_destination(dc)
        store = CorruptingStore(dest._store, corrupt=2)  # type: ignore[attr-defined]
        dest._store = store  # type: ignore[attr-defined]
        stores.append(store)
        return dest

    async def body() -> list[str]:
        relay = Relay(cfg, journal, spool, RetryPolicy(initial=0.05, maximum=0.1, jitter=0.0), factory=factory)
        task = asyncio.ensure_future(relay.run())
        seen: list[str] = []
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                (d,) = journal.deliveries_of(t.id)
                if not seen or seen[-1] != d.state:
                    seen.append(d.state)
                if d.state in ("delivered", "failed"):
                    return seen
                await asyncio.sleep(0.01)
            raise AssertionError(f"not delivered in time: {seen}")
        finally:
            await relay.stop(5)
            task.cancel()

    states = run(body())
    (d,) = journal.deliveries_of(t.id)
    assert d.state == "delivered" and d.attempts == 3, (states, d)
    assert d.verified == "sha256" and d.remote_digest == t.sha256
    assert (archive / "x.bin").read_bytes() == data
    manifest = json.loads(journal.manifest_of(t.id).body)  # type: ignore[union-attr]
    assert manifest["digests"]["sha256"] == d.remote_digest and manifest["source"] == "192.0.2.7:1234"
    journal.close()
