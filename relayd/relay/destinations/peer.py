"""The ``relayd`` destination: another relayd gateway, reached over SSH, delta-synced, receipted.

Connections, host key pinning and pooling are the sftp kind's (:class:`SftpDestination`); each
delivery opens one ``relayd-peer@relayd`` subsystem channel and speaks the peer protocol
(docs/peer-protocol.md): HELLO, OFFER (the signed manifest and the target path), then the file
as delta operations against the receiver's current version of the path (or whole), DONE, and a
RECEIPT signed by the receiving gateway, stored with the delivery.

If the receiver finds the rebuilt file does not match the manifest (``digest-mismatch``, e.g. a
damaged basis), the delivery is sent again once, whole. Delta work runs in a worker thread and
streams: memory stays bounded by a few frames whatever the file size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Iterator

import asyncssh

from relayd.config.model import DestinationConfig
from relayd.integrity.manifest import parse_json_document
from relayd.integrity.receipt import RECEIPT_KIND
from relayd.peerproto import (PROTOCOL, SUBSYSTEM, VERSION, ErrorCode, Frame, PeerProtocolError, encode_frame,
                              encode_json, expect, parse_json)
from relayd.relay import delta as deltalib
from relayd.relay.destinations.base import DestinationError, Outcome, Payload, open_spool_object, register
from relayd.relay.destinations.sftp import SftpDestination, _Conn, _describe

__all__ = ["PeerDestination"]

log = logging.getLogger("relayd.relay.destinations.peer")

DELTA_MIN = 64 * 1024
"""Files smaller than this are offered whole (a signature would cost more than it saves)."""
_LITERAL_CHUNK = 256 * 1024
_QUEUE_FRAMES = 4
_FRAME_BODY = 1024 * 1024
"""DATA frame body size the sender makes (memory in flight: a few frames)."""
_DONE = object()


@register("relayd")
class PeerDestination(SftpDestination):
    """Delivers to another relayd's tenant through the peer protocol."""

    default_port = 2222

    def __init__(self, config: DestinationConfig) -> None:
        super().__init__(config)
        self.slots = int(config.options.get("concurrency") or 4) * 4

    async def _open_session(self, ssh: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient | None:
        return None  # one subsystem channel per delivery instead

    async def deliver(self, payload: Payload) -> Outcome:
        """Offer, send (delta or whole), collect the receipt; see the module docstring."""
        final = self.target.final_path(payload)
        context = f"dest={self.name} delivery={payload.delivery_id}"
        if payload.manifest is None:
            raise DestinationError("this transfer has no signed manifest; a relayd peer only accepts signed "
                                   "offers", retryable=False)
        try:
            async with self.pool.connection() as conn:
                use_delta = payload.size >= DELTA_MIN
                try:
                    outcome = await self._send(conn, payload, final, use_delta)
                except PeerProtocolError as e:
                    if e.code != ErrorCode.DIGEST or not use_delta:
                        raise
                    log.warning("%s receiver rebuilt a file that does not match the manifest (%s); sending it "
                                "whole", context, e.message)
                    outcome = await self._send(conn, payload, final, False)
        except DestinationError:
            raise
        except PeerProtocolError as e:
            retryable = e.retryable or e.code in (ErrorCode.BUSY, ErrorCode.INTERNAL, ErrorCode.DIGEST,
                                                  ErrorCode.QUOTA, ErrorCode.MALFORMED)
            raise DestinationError(f"peer {self.where} refused: {e.code}: {e.message}", retryable=retryable) from e
        except (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError) as e:
            raise DestinationError(f"connection to {self.where} failed: {_describe(e)}", retryable=True) from e
        except Exception as e:  # a bug: log it whole, try again later
            log.exception("%s unexpected error", context)
            raise DestinationError(f"unexpected error: {type(e).__name__}", retryable=True) from e
        log.debug("%s delivered %s (%d bytes on the wire; %s)", context, outcome.remote_path, outcome.bytes_sent,
                  outcome.note)
        return outcome

    async def _send(self, conn: _Conn, payload: Payload, final: str, use_delta: bool) -> Outcome:
        assert payload.manifest is not None
        writer, reader, _ = await conn.ssh.open_session(subsystem=SUBSYSTEM, encoding=None)
        try:
            return await self._conversation(reader, writer, payload, final, use_delta)
        finally:
            writer.close()

    async def _conversation(self, reader: Any, writer: Any, payload: Payload, final: str,
                            use_delta: bool) -> Outcome:
        assert payload.manifest is not None
        timeout = self.connect_timeout
        writer.write(encode_json(Frame.HELLO, {"protocol": PROTOCOL, "versions": [VERSION]}))
        _, p = await asyncio.wait_for(expect(reader, Frame.HELLO), timeout)
        hello = parse_json(Frame.HELLO, p)
        if hello.get("version") != VERSION:
            raise PeerProtocolError(ErrorCode.VERSION, f"peer answered version {hello.get('version')!r}")
        doc = json.loads(_sidecar_doc(payload))
        writer.write(encode_json(Frame.OFFER, {"manifest": doc, "path": final, "delta": use_delta}))
        _, p = await asyncio.wait_for(expect(reader, Frame.ACCEPT), timeout + payload.size / 20e6)
        accept = parse_json(Frame.ACCEPT, p)
        mode = accept.get("mode")
        wire = 0
        stats = deltalib.DeltaStats()
        if mode == "have":
            note = "already received by the peer; nothing sent"
        elif mode in ("delta", "full"):
            sig = None
            if mode == "delta":
                sig = await self._read_signature(reader, accept)
                sig_bytes = int(accept["signature_bytes"])
            wire = await self._stream(writer, payload, sig, stats)
            writer.write(encode_json(Frame.DONE, {"literal_bytes": stats.literal_bytes,
                                                  "copied_bytes": stats.copied_bytes}))
            await writer.drain()
            if mode == "delta":
                note = (f"delta: {stats.literal_bytes} literal bytes, {stats.copied_bytes} copied from the peer's "
                        f"basis, {wire} bytes sent, {sig_bytes} signature bytes received")
            else:
                note = f"sent whole: {wire} bytes on the wire"
        else:
            raise PeerProtocolError(ErrorCode.MALFORMED, f"unknown ACCEPT mode {mode!r}")
        _, p = await asyncio.wait_for(expect(reader, Frame.RECEIPT), timeout + payload.size / 20e6)
        receipt = _check_receipt(p, payload)
        return Outcome(remote_path=str(receipt.get("path")), verified="sha256", remote_digest=payload.sha256,
                       bytes_sent=wire, resumed_from=0, note=note, receipt=p.decode())

    async def _read_signature(self, reader: Any, accept: dict[str, Any]) -> deltalib.Signature:
        total = accept.get("signature_bytes")
        if not isinstance(total, int) or not 0 < total <= 256 * 1024 * 1024:
            raise PeerProtocolError(ErrorCode.MALFORMED, "bad signature_bytes")
        parts: list[bytes] = []
        have = 0
        while have < total:
            _, chunk = await asyncio.wait_for(expect(reader, Frame.SIGNATURE), self.connect_timeout)
            parts.append(chunk)
            have += len(chunk)
        if have != total:
            raise PeerProtocolError(ErrorCode.MALFORMED, "signature longer than announced")
        try:
            return await asyncio.to_thread(deltalib.decode_signature, b"".join(parts))
        except deltalib.DeltaError as e:
            raise PeerProtocolError(ErrorCode.MALFORMED, f"bad signature: {e}") from None

    async def _stream(self, writer: Any, payload: Payload, sig: deltalib.Signature | None,
                      stats: deltalib.DeltaStats) -> int:
        """Send DATA frames made in a worker thread (bounded queue); return the bytes written."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue(_QUEUE_FRAMES)
        stop = False

        def produce() -> None:
            fd = open_spool_object(payload.source, payload.size)
            try:
                ops = (deltalib.delta(fd, payload.size, sig, stats=stats) if sig is not None
                       else _whole(fd, payload.size, stats))
                for frame in deltalib.encode_ops(ops, _FRAME_BODY):
                    if stop:
                        return
                    asyncio.run_coroutine_threadsafe(queue.put(frame), loop).result()
            finally:
                os.close(fd)
                asyncio.run_coroutine_threadsafe(queue.put(_DONE), loop).result()

        worker = loop.run_in_executor(None, produce)
        wire = 0
        try:
            while True:
                frame = await queue.get()
                if frame is _DONE:
                    break
                data = encode_frame(Frame.DATA, frame)
                writer.write(data)
                wire += len(data)
                await writer.drain()
            await worker
        finally:
            stop = True
            while not worker.done():  # unblock the producer if we stopped early
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    await asyncio.sleep(0.01)
        return wire


def _whole(fd: int, size: int, stats: deltalib.DeltaStats) -> Iterator[deltalib.Literal]:
    pos = 0
    while pos < size:
        data = os.pread(fd, min(_LITERAL_CHUNK, size - pos), pos)
        if not data:
            raise DestinationError("spool object ended early", retryable=False)
        pos += len(data)
        stats.literal_bytes += len(data)
        yield deltalib.Literal(data)


def _sidecar_doc(payload: Payload) -> bytes:
    from relayd.integrity.manifest import sidecar_bytes

    assert payload.manifest is not None
    return sidecar_bytes(payload.manifest)


def _check_receipt(data: bytes, payload: Payload) -> dict[str, Any]:
    """The receipt object, after checking it names our file (signature: see relayd verify --receipt)."""
    try:
        receipt, _, _ = parse_json_document(data, "receipt")
    except Exception as e:  # noqa: BLE001 - any parse failure is a protocol error
        raise PeerProtocolError(ErrorCode.MALFORMED, f"bad receipt: {e}") from None
    if receipt.get("kind") != RECEIPT_KIND or receipt.get("sha256") != payload.sha256 \
            or receipt.get("size") != payload.size:
        raise PeerProtocolError(ErrorCode.MALFORMED, "receipt does not match the delivered file")
    return receipt


