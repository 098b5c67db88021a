"""The relayd peer protocol's framing: versioned, length-prefixed frames on an SSH subsystem.

See docs/peer-protocol.md for the conversation. This module only encodes and decodes frames
(pure, no I/O policy): ``[u32 length][u8 type][payload]``, where ``length`` counts type and
payload. Control frames carry one canonical JSON object; data frames carry bytes (signature
chunks, encoded delta operations). Every read is bounded by :data:`MAX_FRAME`.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Protocol

__all__ = ["SUBSYSTEM", "PROTOCOL", "VERSION", "MAX_FRAME", "Frame", "PeerProtocolError", "encode_frame",
           "encode_json", "read_frame", "parse_json", "expect", "ErrorCode"]

SUBSYSTEM = "relayd-peer@relayd"
PROTOCOL = "relayd-peer"
VERSION = 1
MAX_FRAME = 4 * 1024 * 1024
"""Largest frame accepted (type + payload); larger announced lengths end the conversation."""
_MAX_JSON = 1024 * 1024


class Frame:
    """Frame types (one byte)."""

    HELLO = 1       # json: {"protocol", "versions"|"version", "gateway"}
    OFFER = 2       # json: {"manifest": sidecar document, "path", "delta": bool}
    ACCEPT = 3      # json: {"mode": "delta"|"full"|"have", "block_size", "seed", "signature_bytes"}
    SIGNATURE = 4   # bytes: a chunk of the encoded block signature (receiver -> sender)
    DATA = 5        # bytes: one encoded delta-operations frame (sender -> receiver)
    DONE = 6        # json: {"frames", "literal_bytes", "copied_bytes"} (sender -> receiver)
    RECEIPT = 7     # json: the signed receipt document (receiver -> sender)
    ERROR = 8       # json: {"code", "message", "retryable"}

    NAMES = {1: "HELLO", 2: "OFFER", 3: "ACCEPT", 4: "SIGNATURE", 5: "DATA", 6: "DONE", 7: "RECEIPT", 8: "ERROR"}


class ErrorCode:
    """``code`` values of ERROR frames."""

    VERSION = "version-mismatch"
    MALFORMED = "malformed-frame"
    UNTRUSTED = "untrusted-signer"
    FORBIDDEN = "forbidden"
    PATH = "bad-path"
    DIGEST = "digest-mismatch"
    QUOTA = "quota"
    BUSY = "unavailable"
    INTERNAL = "internal"


class PeerProtocolError(Exception):
    """A protocol violation or an ERROR frame from the other side."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class _Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    """One frame."""
    if not 1 + len(payload) <= MAX_FRAME:
        raise ValueError("frame too large")
    return struct.pack(">IB", 1 + len(payload), kind) + payload


def encode_json(kind: int, obj: dict[str, Any]) -> bytes:
    """A control frame holding ``obj`` as canonical JSON."""
    return encode_frame(kind, json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


async def read_frame(reader: _Reader) -> tuple[int, bytes]:
    """The next ``(type, payload)``; PeerProtocolError on a bad length or a closed stream."""
    try:
        head = await reader.readexactly(5)
    except asyncio.IncompleteReadError as e:
        raise PeerProtocolError(ErrorCode.MALFORMED, "connection closed mid-conversation" if e.partial
                                else "connection closed", retryable=True) from None
    length, kind = struct.unpack(">IB", head)
    if length < 1 or length > MAX_FRAME:
        raise PeerProtocolError(ErrorCode.MALFORMED, f"frame length {length} out of range")
    if kind not in Frame.NAMES:
        raise PeerProtocolError(ErrorCode.MALFORMED, f"unknown frame type {kind}")
    try:
        payload = await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError:
        raise PeerProtocolError(ErrorCode.MALFORMED, "connection closed mid-frame", retryable=True) from None
    return kind, payload


def parse_json(kind: int, payload: bytes) -> dict[str, Any]:
    """The JSON object of a control frame; PeerProtocolError if it is not one."""
    if len(payload) > _MAX_JSON:
        raise PeerProtocolError(ErrorCode.MALFORMED, f"{Frame.NAMES.get(kind, kind)} frame too large")
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PeerProtocolError(ErrorCode.MALFORMED, f"{Frame.NAMES.get(kind, kind)} frame is not JSON") from None
    if not isinstance(obj, dict):
        raise PeerProtocolError(ErrorCode.MALFORMED, f"{Frame.NAMES.get(kind, kind)} frame is not an object")
    return obj


async def expect(reader: _Reader, *kinds: int) -> tuple[int, bytes]:
    """Read a frame of one of ``kinds``; an ERROR frame becomes PeerProtocolError (its code)."""
    kind, payload = await read_frame(reader)
    if kind == Frame.ERROR and Frame.ERROR not in kinds:
        err = parse_json(kind, payload)
        raise PeerProtocolError(str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", ""))[:500],
                                bool(err.get("retryable", False)))
    if kind not in kinds:
        names = "/".join(Frame.NAMES[k] for k in kinds)
        raise PeerProtocolError(ErrorCode.MALFORMED, f"expected {names}, got {Frame.NAMES[kind]}")
    return kind, payload
