"""Peer relay between two relayd processes on 127.0.0.1: delta sync, signed offers and receipts.

The sender (tenant ``acme``) routes everything to a ``relayd`` destination; the receiver's peer
user ``from-a`` (tenant ``archive``) trusts the sender's manifest key, and the receiver routes
what it gets onward to a local directory (multi-hop).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import asyncssh
import pytest

from relayd.integrity import KeyRing
from relayd.integrity.keys import public_openssh
from relayd.peerproto import SUBSYSTEM, Frame, encode_frame, encode_json, read_frame
from tests.helpers import (Daemon, Key, base_config, free_port, make_key, relayd, run_daemon, sha256_file,
                           start_daemon, wait_for)

MIB = 1024 * 1024


@dataclass
class Pair:
    sender: Daemon
    receiver: Daemon
    user_key: Key          # uploads into the sender (tenant acme)
    peer_key: Key          # the sender's login at the receiver
    onward: Path           # the receiver's local destination
    tmp: Path

    def upload(self, local: Path, remote: str) -> None:
        r = self.sender.sftp(self.user_key, "acme-erp", f"put {local} {remote}\n")
        assert r.returncode == 0, r.stderr

    def delivery(self, path: str) -> dict[str, Any] | None:
        rows = [t for t in self.sender.transfers() if t["path"] == path]
        return rows[-1]["deliveries"][0] if rows and rows[-1]["deliveries"] else None

    def wait_delivered(self, path: str, timeout: float = 60) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            d = self.delivery(path)
            if d is not None and d["state"] == "failed":
                raise AssertionError(f"delivery failed: {d}\n{self.sender.log()[-3000:]}")
            return d if d is not None and d["state"] == "delivered" else None
        return wait_for(done, timeout, interval=0.1, what=f"{path} delivered")  # type: ignore[no-any-return]

    def received(self, name: str) -> Path:
        return self.receiver.inbox("archive") / "acme" / name


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _configs(tmp: Path, user_key: Key, peer_key: Key, signer_line: str, recv_port: int, send_port: int,
             recv_host_key: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    recv = base_config(tmp / "R", recv_port, {
        "archive": {"users": [{"name": "from-a", "authorized_keys": [peer_key.pub], "permissions": ["peer"],
                               "trusted_signers": [signer_line]}],
                    "routes": [{"match": "**", "to": ["onward"]}]},
    })
    recv["node"]["id"] = "gw-r"
    recv["destinations"] = {"onward": {"type": "local", "path": str(tmp / "onward")}}
    send = base_config(tmp / "S", send_port, {
        "acme": {"users": [{"name": "acme-erp", "authorized_keys": [user_key.pub],
                            "permissions": ["upload", "list", "overwrite", "mkdir"]}],
                 "routes": [{"match": "**", "to": ["dr"]}]},
    })
    send["node"]["id"] = "gw-s"
    send["destinations"] = {"dr": {"type": "relayd", "host": "127.0.0.1", "port": recv_port, "user": "from-a",
                                   "identity": str(peer_key.path), "known_hosts": str(tmp / "known_hosts"),
                                   "path": "/{tenant}", "retry_initial": "0.3s", "retry_max": "1s"}}
    return recv, send


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    user_key = make_key(tmp_path / "keys", "user")
    peer_key = make_key(tmp_path / "keys", "peer")
    ring = KeyRing.open(tmp_path / "S" / "state")  # the sender's manifest key, made before it starts
    recv_port, send_port = free_port(), free_port()
    recv, send = _configs(tmp_path, user_key, peer_key, public_openssh(ring.public), recv_port, send_port)
    with ExitStack() as stack:
        r = stack.enter_context(run_daemon(tmp_path / "R", recv))
        host = (tmp_path / "R" / "state" / "ssh_host_ed25519_key.pub").read_text().split()
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{recv_port} {host[0]} {host[1]}\n")
        s = stack.enter_context(run_daemon(tmp_path / "S", send))
        yield Pair(s, r, user_key, peer_key, tmp_path / "onward", tmp_path)


def test_new_file_sent_whole_then_relayed_onward_with_receipt(pair: Pair) -> None:
    src = pair.tmp / "a.bin"
    src.write_bytes(_rand(3 * MIB + 123, 1))
    pair.upload(src, "/a.bin")
    d = pair.wait_delivered("/a.bin")
    assert sha256_file(pair.received("a.bin")) == sha256_file(src)
    assert "sent whole" in (d["last_error"] or "")
    # Multi-hop: the receiver committed it in its own tenant and relayed it by its own routes.
    wait_for(lambda: (pair.onward / "acme" / "a.bin").exists(), 30, what="onward delivery")
    assert sha256_file(pair.onward / "acme" / "a.bin") == sha256_file(src)
    rt = [t for t in pair.receiver.transfers() if t["path"] == "/acme/a.bin"]
    assert len(rt) == 1 and rt[0]["user"] == "from-a"
    # The receipt: stored with the delivery, signed by the receiver, naming the receiver's transfer.
    out = pair.tmp / "receipt.json"
    r = relayd("receipt", "-c", str(pair.sender.config_path), d["id"], "-o", str(out))
    assert r.returncode == 0, r.stderr
    receipt = json.loads(out.read_text())["receipt"]
    assert receipt["transfer_id"] == rt[0]["id"] and receipt["sender_gateway"] == "gw-s"
    keys = pair.tmp / "rkeys"
    assert relayd("keys", "export", "-c", str(pair.receiver.config_path), str(keys)).returncode == 0
    v = relayd("verify", "--receipt", str(out), "--keys", str(keys), str(src))
    assert v.returncode == 0 and v.stdout.strip() == f"OK {rt[0]['id']} {sha256_file(src)}", v.stdout + v.stderr
    # The sender's own key cannot vouch for the receiver's receipt.
    skeys = pair.tmp / "skeys"
    relayd("keys", "export", "-c", str(pair.sender.config_path), str(skeys))
    bad = relayd("verify", "--receipt", str(out), "--keys", str(skeys))
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL unknown key id")


def test_resend_and_edits_move_about_the_changed_bytes(pair: Pair) -> None:
    size = 8 * MIB
    base = bytearray(_rand(size, 2))
    src = pair.tmp / "ledger.bin"
    src.write_bytes(base)
    pair.upload(src, "/ledger.bin")
    first = pair.wait_delivered("/ledger.bin")
    assert first["bytes_sent"] >= size  # no basis yet: whole

    # Identical re-send (a new transfer of the same content): almost nothing on the wire.
    pair.upload(src, "/ledger.bin")
    wait_for(lambda: len([t for t in pair.sender.transfers() if t["path"] == "/ledger.bin"]) == 2, 10,
             what="second transfer")
    same = pair.wait_delivered("/ledger.bin")
    assert same["id"] != first["id"] and same["bytes_sent"] < size // 100, same
    assert "delta:" in same["last_error"]

    # Scattered edits: 16 x 4 KiB overwritten (0.8%).
    rnd = random.Random(3)
    for _ in range(16):
        at = rnd.randrange(0, size - 4096)
        base[at:at + 4096] = _rand(4096, rnd.randrange(1 << 30))
    src.write_bytes(base)
    pair.upload(src, "/ledger.bin")
    wait_for(lambda: len([t for t in pair.sender.transfers() if t["path"] == "/ledger.bin"]) == 3, 10,
             what="third transfer")
    edited = pair.wait_delivered("/ledger.bin")
    assert edited["bytes_sent"] < 16 * (4096 + 2 * 65536) + 64 * 1024, edited
    assert sha256_file(pair.received("ledger.bin")) == sha256_file(src)

    # 1,000 bytes inserted at the front: everything after still matches.
    new = _rand(1000, 4) + bytes(base)
    src.write_bytes(new)
    pair.upload(src, "/ledger.bin")
    wait_for(lambda: len([t for t in pair.sender.transfers() if t["path"] == "/ledger.bin"]) == 4, 10,
             what="fourth transfer")
    front = pair.wait_delivered("/ledger.bin")
    assert front["bytes_sent"] < 200 * 1024, front
    assert sha256_file(pair.received("ledger.bin")) == sha256_file(src)


def test_changed_basis_costs_only_its_blocks(pair: Pair) -> None:
    """A basis damaged before the offer is simply part of the signature: the damaged blocks travel
    as literals and the result is exact."""
    size = 4 * MIB
    data = bytearray(_rand(size, 5))
    src = pair.tmp / "c.bin"
    src.write_bytes(data)
    pair.upload(src, "/c.bin")
    pair.wait_delivered("/c.bin")
    basis = pair.received("c.bin")
    os.chmod(basis, 0o644)
    with open(basis, "r+b") as f:
        f.seek(size // 3)
        f.write(b"\0" * 1000)
    data[10:20] = b"0123456789"
    src.write_bytes(data)
    pair.upload(src, "/c.bin")
    wait_for(lambda: len([t for t in pair.sender.transfers() if t["path"] == "/c.bin"]) == 2, 10,
             what="second transfer")
    d = pair.wait_delivered("/c.bin")
    assert sha256_file(pair.received("c.bin")) == sha256_file(src)
    assert "delta:" in d["last_error"] and d["bytes_sent"] < 256 * 1024, d


def test_corrupted_basis_is_detected_and_healed_by_a_full_resend(tmp_path: Path) -> None:
    """A basis that rots after its signature was made (fault injection in the receiver): the
    rebuilt file fails the SHA-256 check, nothing wrong is committed, the sender sends it whole."""
    user_key = make_key(tmp_path / "keys", "user")
    peer_key = make_key(tmp_path / "keys", "peer")
    ring = KeyRing.open(tmp_path / "S" / "state")
    recv_port, send_port = free_port(), free_port()
    recv, send = _configs(tmp_path, user_key, peer_key, public_openssh(ring.public), recv_port, send_port)
    with run_daemon(tmp_path / "R", recv, env={"RELAYD_FAULTS": "peer-basis-bitflip"}) as r:
        host = (tmp_path / "R" / "state" / "ssh_host_ed25519_key.pub").read_text().split()
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{recv_port} {host[0]} {host[1]}\n")
        with run_daemon(tmp_path / "S", send) as s:
            p = Pair(s, r, user_key, peer_key, tmp_path / "onward", tmp_path)
            data = bytearray(_rand(4 * MIB, 8))
            src = tmp_path / "c.bin"
            src.write_bytes(data)
            p.upload(src, "/c.bin")
            p.wait_delivered("/c.bin")
            data[10:20] = b"0123456789"
            src.write_bytes(data)
            p.upload(src, "/c.bin")
            wait_for(lambda: len([t for t in s.transfers() if t["path"] == "/c.bin"]) == 2, 10,
                     what="second transfer")
            d = p.wait_delivered("/c.bin")
            assert sha256_file(p.received("c.bin")) == sha256_file(src)
            assert "sent whole" in d["last_error"], d
            assert "code=digest-mismatch" in r.log()
            # Exactly two versions committed on the receiver: the bad rebuild never was.
            assert len([t for t in r.transfers() if t["path"] == "/acme/c.bin"]) == 2


def test_untrusted_signer_is_refused_and_nothing_committed(tmp_path: Path) -> None:
    user_key = make_key(tmp_path / "keys", "user")
    peer_key = make_key(tmp_path / "keys", "peer")
    stranger = KeyRing.open(tmp_path / "stranger")  # the receiver trusts this key, not the sender's
    recv_port, send_port = free_port(), free_port()
    recv, send = _configs(tmp_path, user_key, peer_key, public_openssh(stranger.public), recv_port, send_port)
    send["destinations"]["dr"]["max_attempts"] = 1
    with run_daemon(tmp_path / "R", recv) as r:
        host = (tmp_path / "R" / "state" / "ssh_host_ed25519_key.pub").read_text().split()
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{recv_port} {host[0]} {host[1]}\n")
        with run_daemon(tmp_path / "S", send) as s:
            src = tmp_path / "u.bin"
            src.write_bytes(_rand(100_000, 6))
            assert s.sftp(user_key, "acme-erp", f"put {src} /u.bin\n").returncode == 0

            def state() -> str | None:
                rows = [t for t in s.transfers() if t["path"] == "/u.bin"]
                return rows[0]["deliveries"][0]["state"] if rows else None
            wait_for(lambda: state() == "failed", 30, what="delivery failed")
            d = [t for t in s.transfers() if t["path"] == "/u.bin"][0]["deliveries"][0]
            assert "untrusted-signer" in d["last_error"]
            assert r.transfers() == []
            assert "refused: peer" in r.log() and "code=untrusted-signer" in r.log()


def _raw_peer(port: int, key: Key, frames: list[bytes]) -> list[tuple[int, bytes]]:
    """Speak raw frames to the receiver's subsystem; return what came back (until it closed)."""
    async def body() -> list[tuple[int, bytes]]:
        async with asyncssh.connect("127.0.0.1", port, username="from-a", client_keys=[str(key.path)],
                                    known_hosts=None) as conn:
            writer, reader, _ = await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
            for f in frames:
                writer.write(f)
            writer.write_eof()
            got = []
            try:
                while True:
                    got.append(await asyncio.wait_for(read_frame(reader), 10))
            except Exception:  # noqa: BLE001 - closed
                pass
            return got
    return asyncio.run(body())


def test_hostile_frames_get_clean_errors(pair: Pair) -> None:
    port = pair.receiver.port
    hello = encode_json(Frame.HELLO, {"protocol": "relayd-peer", "versions": [1]})
    cases = {
        "version": [encode_json(Frame.HELLO, {"protocol": "relayd-peer", "versions": [99]})],
        "garbage": [b"\xff\xff\xff\xff\x01junk"],
        "notjson": [hello, encode_frame(Frame.OFFER, b"{not json")],
        "unsigned": [hello, encode_json(Frame.OFFER, {"manifest": {"manifest": {"size": 1}, "signature": "AA=="},
                                                      "path": "/x"})],
    }
    codes = {}
    for name, frames in cases.items():
        got = _raw_peer(port, pair.peer_key, frames)
        errors = [json.loads(p) for k, p in got if k == Frame.ERROR]
        assert errors, (name, got)
        codes[name] = errors[-1]["code"]
    assert codes == {"version": "version-mismatch", "garbage": "malformed-frame", "notjson": "malformed-frame",
                     "unsigned": "untrusted-signer"}
    # A path escape in a properly signed offer: take a real manifest from the sender's journal.
    src = pair.tmp / "p.bin"
    src.write_bytes(b"x" * 1000)
    pair.upload(src, "/p.bin")
    pair.wait_delivered("/p.bin")
    t = [t for t in pair.sender.transfers() if t["path"] == "/p.bin"][0]
    doc = json.loads(relayd("manifest", "-c", str(pair.sender.config_path), t["id"], check=True).stdout)
    for bad in ("/../../etc/x", "relative", "/a/./b", "/a//b", "/"):
        got = _raw_peer(port, pair.peer_key, [hello, encode_json(Frame.OFFER, {"manifest": doc, "path": bad})])
        errors = [json.loads(p) for k, p in got if k == Frame.ERROR]
        assert errors and errors[-1]["code"] == "bad-path", (bad, got)
    assert "code=bad-path" in pair.receiver.log()
    assert not list(pair.receiver.spool.rglob("x"))
    # The receiver keeps serving: a normal delivery still works.
    src.write_bytes(b"y" * 2000)
    pair.upload(src, "/p2.bin")
    pair.wait_delivered("/p2.bin")


def test_peer_subsystem_needs_the_peer_permission(pair: Pair) -> None:
    async def body() -> str:
        async with asyncssh.connect("127.0.0.1", pair.sender.port, username="acme-erp",
                                    client_keys=[str(pair.user_key.path)], known_hosts=None) as conn:
            try:
                await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
            except asyncssh.Error as e:
                return f"refused: {e}"
            return "opened"
    assert asyncio.run(body()).startswith("refused")
    wait_for(lambda: "refused: peer subsystem without the peer permission" in pair.sender.log(), 10,
             what="refusal logged")


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_kill9_mid_transfer_recovers(tmp_path: Path, victim: str) -> None:
    user_key = make_key(tmp_path / "keys", "user")
    peer_key = make_key(tmp_path / "keys", "peer")
    ring = KeyRing.open(tmp_path / "S" / "state")
    recv_port, send_port = free_port(), free_port()
    recv, send = _configs(tmp_path, user_key, peer_key, public_openssh(ring.public), recv_port, send_port)
    size = 200 * MIB
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for i in range(size // MIB):
            f.write(_rand(MIB, 100 + i))
    r = start_daemon(tmp_path / "R", recv)
    host = (tmp_path / "R" / "state" / "ssh_host_ed25519_key.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{recv_port} {host[0]} {host[1]}\n")
    s = start_daemon(tmp_path / "S", send)
    try:
        assert s.sftp(user_key, "acme-erp", f"put {src} /big.bin\n").returncode == 0
        staging = Path(recv["node"]["spool_dir"]) / "archive" / "incoming"
        wait_for(lambda: any(p.stat().st_size > 20 * MIB for p in staging.iterdir()) if staging.exists() else False,
                 60, interval=0.05, what="transfer under way")
        if victim == "sender":
            s.kill9()
            s = start_daemon(tmp_path / "S", send)
        else:
            r.kill9()
            r = start_daemon(tmp_path / "R", recv)
        final = Path(recv["node"]["spool_dir"]) / "archive" / "inbox" / "acme" / "big.bin"

        def delivered() -> bool:
            rows = [t for t in s.transfers() if t["path"] == "/big.bin"]
            return bool(rows) and rows[0]["deliveries"][0]["state"] == "delivered"
        wait_for(delivered, 180, interval=0.2, what="delivered after the kill")
        assert sha256_file(final) == sha256_file(src)
        assert len([t for t in r.transfers() if t["path"] == "/acme/big.bin"]) == 1
        assert not list((Path(recv["node"]["spool_dir"]) / "archive" / "incoming").iterdir())
    finally:
        for d in (s, r):
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()


def test_repeated_offer_of_a_committed_transfer_is_answered_not_committed_again(pair: Pair) -> None:
    """A sender that crashed after the receiver committed offers the same transfer again: the
    receiver answers ``have`` with a receipt for its existing commit and commits nothing."""
    src = pair.tmp / "h.bin"
    src.write_bytes(_rand(200_000, 9))
    pair.upload(src, "/h.bin")
    d = pair.wait_delivered("/h.bin")
    t = [t for t in pair.sender.transfers() if t["path"] == "/h.bin"][0]
    doc = json.loads(relayd("manifest", "-c", str(pair.sender.config_path), t["id"], check=True).stdout)
    before = [x for x in pair.receiver.transfers() if x["path"] == "/acme/h.bin"]
    assert len(before) == 1
    hello = encode_json(Frame.HELLO, {"protocol": "relayd-peer", "versions": [1]})
    got = _raw_peer(pair.receiver.port, pair.peer_key,
                    [hello, encode_json(Frame.OFFER, {"manifest": doc, "path": "/acme/h.bin", "delta": True})])
    kinds = [k for k, _ in got]
    assert kinds == [Frame.HELLO, Frame.ACCEPT, Frame.RECEIPT], got
    assert json.loads(got[1][1]) == {"mode": "have"}
    receipt = json.loads(got[2][1])["receipt"]
    assert receipt["transfer_id"] == before[0]["id"] and receipt["sender_transfer_id"] == t["id"]
    assert json.loads(d["receipt"])["receipt"]["transfer_id"] == before[0]["id"]  # the sender's stored one
    assert [x for x in pair.receiver.transfers() if x["path"] == "/acme/h.bin"] == before
