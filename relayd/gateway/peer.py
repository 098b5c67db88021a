"""The receiving side of the peer protocol (``relayd-peer@relayd`` subsystem).

A user with the ``peer`` permission is another relayd delivering into this user's tenant. Per
offer (docs/peer-protocol.md): check the manifest's signature against the user's
``trusted_signers``; answer ``have`` with a receipt if this exact sender transfer was committed
before (a repeated delivery is never committed twice); else send the block signature of the
current version of the path (the basis) or ask for the whole file; rebuild the file from the
delta into a private staging file through the same tenant view, quotas and commit door as an
SFTP upload; check size and SHA-256 against the manifest; commit (the file then relays onward by
this tenant's routes); answer with a receipt signed by this gateway's key.

Any violation ends the conversation with an ERROR frame and a ``refused: peer`` log line;
nothing is committed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
from typing import Any

import asyncssh
from asyncssh.sftp import FXF_CREAT, FXF_TRUNC, FXF_WRITE, SFTPAttrs

from relayd.gateway.paths import PathRefused, normalize, to_virtual
from relayd.gateway.sftp import TenantSFTPServer, WriteHandle
from relayd.integrity import key_id
from relayd.integrity.manifest import VerifyError, canonical, verify_document
from relayd.integrity.receipt import build_receipt
from relayd.peerproto import (PROTOCOL, VERSION, ErrorCode, Frame, PeerProtocolError, encode_frame, encode_json,
                              expect, parse_json, read_frame)
from relayd.relay import delta as deltalib

__all__ = ["serve_peer", "PEER_PERMISSIONS"]

log = logging.getLogger("relayd.gateway.peer")

PEER_PERMISSIONS = frozenset({"upload", "overwrite", "mkdir", "list"})
"""What a peer session may do inside its tenant (through this module only)."""
DELTA_MIN_BASIS = 64 * 1024
"""A basis smaller than this is not worth a signature: the sender sends the file whole."""
_SIG_CHUNK = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_FAULTS = frozenset(os.environ.get("RELAYD_FAULTS", "").split(","))
"""Fault injection for tests only: ``peer-basis-bitflip`` flips a bit of the first block copied
from each basis, as if the basis rotted after its signature was made (the end-to-end SHA-256
check must then refuse the file and the sender must fall back to a full transfer)."""


def _trusted_keys(signers: tuple[str, ...]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    keys: dict[str, Any] = {}
    for line in signers:
        try:
            pub = serialization.load_ssh_public_key(line.encode())
        except (ValueError, TypeError):
            continue
        keys[key_id(pub)] = pub  # type: ignore[arg-type]
    return keys


async def serve_peer(server: TenantSFTPServer, reader: Any, writer: Any, chan: asyncssh.SSHServerChannel) -> None:
    """Run one peer conversation on a session channel; always ends the channel."""
    server.perms = PEER_PERMISSIONS
    who = server._ctx()
    status = 0
    peer = _Receiver(server, reader, writer, who)
    try:
        await peer.run()
    except PeerProtocolError as e:
        status = 1
        level = logging.INFO if e.code == ErrorCode.MALFORMED and e.retryable else logging.WARNING
        log.log(level, "refused: peer %s code=%s %s", who, e.code, e.message)
        if not (e.retryable and e.code == ErrorCode.MALFORMED):  # the other side is still there
            try:
                writer.write(encode_json(Frame.ERROR, {"code": e.code, "message": e.message,
                                                       "retryable": e.retryable}))
                await writer.drain()
            except (OSError, asyncssh.Error):
                pass
    except (OSError, asyncssh.Error) as e:
        status = 1
        log.warning("peer %s connection problem: %s", who, e)
    except Exception:  # noqa: BLE001 - a bug must not take the daemon down; the sender retries
        status = 1
        log.exception("peer %s internal error", who)
        try:
            writer.write(encode_json(Frame.ERROR, {"code": ErrorCode.INTERNAL, "message": "internal error",
                                                   "retryable": True}))
        except (OSError, asyncssh.Error):
            pass
    finally:
        peer.abort()
        server.exit()
        try:
            chan.exit(status)
        except (OSError, asyncssh.Error):
            pass


class _Receiver:
    """State of one conversation (at most one upload handle open at a time)."""

    def __init__(self, server: TenantSFTPServer, reader: Any, writer: Any, who: str) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.who = who
        self.handle: WriteHandle | None = None
        self.basis_fd: int | None = None

    def abort(self) -> None:
        if self.handle is not None and not self.handle.done:
            self.server.abort(self.handle)
        self.handle = None
        if self.basis_fd is not None:
            os.close(self.basis_fd)
            self.basis_fd = None

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def run(self) -> None:
        ctx = self.server.ctx
        notary = ctx.spool.notary
        if notary is None:
            raise PeerProtocolError(ErrorCode.FORBIDDEN, "this gateway does not sign receipts "
                                    "(integrity.manifests is false)")
        _, payload = await expect(self.reader, Frame.HELLO)
        hello = parse_json(Frame.HELLO, payload)
        versions = hello.get("versions")
        if hello.get("protocol") != PROTOCOL or not isinstance(versions, list) or VERSION not in versions:
            raise PeerProtocolError(ErrorCode.VERSION, f"this gateway speaks {PROTOCOL} version {VERSION}")
        await self.send(encode_json(Frame.HELLO, {"protocol": PROTOCOL, "version": VERSION,
                                                  "gateway": ctx.config.node.id}))
        while True:
            try:
                kind, payload = await read_frame(self.reader)
            except PeerProtocolError as e:
                if e.retryable and e.message == "connection closed":
                    return  # the sender is done
                raise
            if kind != Frame.OFFER:
                raise PeerProtocolError(ErrorCode.MALFORMED, f"expected OFFER, got {Frame.NAMES[kind]}")
            await self.offer(parse_json(kind, payload))

    async def offer(self, offer: dict[str, Any]) -> None:
        server, ctx = self.server, self.server.ctx
        notary = ctx.spool.notary
        assert notary is not None
        doc = offer.get("manifest")
        path = offer.get("path")
        if not isinstance(doc, dict) or not isinstance(path, str):
            raise PeerProtocolError(ErrorCode.MALFORMED, "OFFER needs manifest (object) and path (string)")
        sent = canonical(doc)
        try:
            manifest = verify_document(sent, _trusted_keys(server.ident.user.trusted_signers))
        except VerifyError as e:
            raise PeerProtocolError(ErrorCode.UNTRUSTED, f"offer not accepted: {e}") from None
        size, sha = manifest.get("size"), manifest.get("digests", {}).get("sha256")
        sender_gw, sender_tid = str(manifest.get("gateway", "")), str(manifest.get("transfer_id", ""))
        if not isinstance(size, int) or size < 0 or not isinstance(sha, str):
            raise PeerProtocolError(ErrorCode.MALFORMED, "manifest lacks size or sha256")
        try:
            parts = normalize(path.encode("utf-8", "surrogateescape"))
        except PathRefused as e:
            raise PeerProtocolError(ErrorCode.PATH, f"path refused: {e}") from None
        vpath = to_virtual(parts)
        if not parts or vpath != path:
            raise PeerProtocolError(ErrorCode.PATH, "path must be absolute, normalized and name a file")
        done = await _db(ctx.spool.journal.origin_transfer, sender_gw, sender_tid)
        if done is not None and done.sha256 == sha:
            log.info("peer %s offer of transfer %s from %s: already committed as %s", self.who, sender_tid,
                     sender_gw, done.id)
            await self.send(encode_json(Frame.ACCEPT, {"mode": "have"}))
            await self.send(encode_frame(Frame.RECEIPT, build_receipt(
                notary.ring, gateway=ctx.config.node.id, tenant=done.tenant, transfer_id=done.id, path=done.path,
                size=done.size, sha256=done.sha256, received_at=done.received_at, sender_manifest=sent,
                sender=manifest)))
            return
        await self._ensure_parents(parts)
        basis_size, sig = await self._signature(parts, vpath, bool(offer.get("delta")))
        try:
            opened = await server.open(vpath.encode(), FXF_WRITE | FXF_CREAT | FXF_TRUNC, SFTPAttrs())
        except asyncssh.SFTPError as e:
            code = ErrorCode.QUOTA if "quota" in e.reason.lower() else ErrorCode.FORBIDDEN
            raise PeerProtocolError(code, e.reason, retryable=code == ErrorCode.QUOTA) from None
        assert isinstance(opened, WriteHandle)
        self.handle = h = opened
        if sig is None:
            await self.send(encode_json(Frame.ACCEPT, {"mode": "full"}))
        else:
            encoded = deltalib.encode_signature(sig)
            await self.send(encode_json(Frame.ACCEPT, {"mode": "delta", "block_size": sig.block_size,
                                                       "signature_bytes": len(encoded)}))
            for i in range(0, len(encoded), _SIG_CHUNK):
                await self.send(encode_frame(Frame.SIGNATURE, encoded[i:i + _SIG_CHUNK]))
        regions: int | None = await self._rebuild(h, size, basis_size, sig.block_size if sig is not None else 0)
        if sig is None:
            regions = None  # a whole file says nothing about how this path changes
        try:
            transfer = await server.commit_upload(h, size, sha, origin=(sender_gw, sender_tid, regions))
        except ValueError as e:
            self.handle = None
            raise PeerProtocolError(ErrorCode.DIGEST, str(e)) from None
        except asyncssh.SFTPError as e:
            self.handle = None
            raise PeerProtocolError(ErrorCode.BUSY, e.reason, retryable=True) from None
        self.handle = None
        self._close_basis()
        log.info("peer %s received transfer %s from %s path=%s size=%d as transfer %s", self.who, sender_tid,
                 sender_gw, vpath, size, transfer.id)
        await self.send(encode_frame(Frame.RECEIPT, build_receipt(
            notary.ring, gateway=ctx.config.node.id, tenant=transfer.tenant, transfer_id=transfer.id,
            path=transfer.path, size=transfer.size, sha256=transfer.sha256, received_at=transfer.received_at,
            sender_manifest=sent, sender=manifest)))

    async def _ensure_parents(self, parts: tuple[str, ...]) -> None:
        for i in range(1, len(parts)):
            prefix = parts[:i]
            real = self.server.root.joinpath(*prefix)
            try:
                st = os.lstat(real)
            except FileNotFoundError:
                try:
                    self.server.mkdir(to_virtual(prefix).encode(), SFTPAttrs())
                except asyncssh.SFTPError as e:
                    raise PeerProtocolError(ErrorCode.PATH, f"cannot create {to_virtual(prefix)}: {e.reason}") from None
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise PeerProtocolError(ErrorCode.PATH, f"{to_virtual(prefix)} is not a directory")

    async def _signature(self, parts: tuple[str, ...], vpath: str,
                         wanted: bool) -> tuple[int, deltalib.Signature | None]:
        """Open the basis (the current file at the path) and make its block signature, if worth it."""
        if not wanted:
            return 0, None
        real = self.server.root.joinpath(*parts)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return 0, None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < DELTA_MIN_BASIS:
            os.close(fd)
            return 0, None
        self.basis_fd = fd
        history = await _db(self.server.ctx.spool.journal.last_changed_regions, self.server.tenant.name, vpath)
        block = deltalib.choose_block_size(st.st_size, history)
        seed = secrets.randbits(63)
        sig = await asyncio.to_thread(deltalib.signature, fd, st.st_size, block, seed)
        return st.st_size, sig

    def _close_basis(self) -> None:
        if self.basis_fd is not None:
            os.close(self.basis_fd)
            self.basis_fd = None

    async def _rebuild(self, h: WriteHandle, size: int, basis_size: int, block: int) -> int:
        """Apply DATA frames until DONE; return the number of changed regions (literal runs)."""
        pos = 0
        regions = 0
        last_literal = False
        flipped = False
        while True:
            kind, payload = await expect(self.reader, Frame.DATA, Frame.DONE)
            if kind == Frame.DONE:
                break
            try:
                ops = list(deltalib.decode_ops([payload]))
            except deltalib.DeltaError as e:
                raise PeerProtocolError(ErrorCode.MALFORMED, f"bad delta frame: {e}") from None
            for op in ops:
                if isinstance(op, deltalib.Literal):
                    data = op.data
                    if pos + len(data) > size:
                        raise PeerProtocolError(ErrorCode.MALFORMED, "more data than the manifest's size")
                    self._write(h, pos, data)
                    pos += len(data)
                    if not last_literal:
                        regions += 1
                    last_literal = True
                else:
                    if self.basis_fd is None or block <= 0 or op.index < 0 or op.count <= 0:
                        raise PeerProtocolError(ErrorCode.MALFORMED, "copy without a basis")
                    start = op.index * block
                    end = min((op.index + op.count) * block, basis_size)
                    if start >= basis_size or end <= start:
                        raise PeerProtocolError(ErrorCode.MALFORMED, "copy outside the basis")
                    if pos + (end - start) > size:
                        raise PeerProtocolError(ErrorCode.MALFORMED, "more data than the manifest's size")
                    while start < end:
                        chunk = os.pread(self.basis_fd, min(_COPY_CHUNK, end - start), start)
                        if not chunk:
                            raise PeerProtocolError(ErrorCode.INTERNAL, "basis shrank", retryable=True)
                        if "peer-basis-bitflip" in _FAULTS and not flipped:
                            chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
                            flipped = True
                        self._write(h, pos, chunk)
                        pos += len(chunk)
                        start += len(chunk)
                    last_literal = False
            await asyncio.sleep(0)  # let other sessions run between frames
        return regions

    def _write(self, h: WriteHandle, pos: int, data: bytes) -> None:
        try:
            self.server.write(h, pos, data)
        except asyncssh.SFTPError as e:
            code = ErrorCode.QUOTA if "quota" in e.reason.lower() else ErrorCode.BUSY
            raise PeerProtocolError(code, e.reason, retryable=True) from None


async def _db(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
