"""Compatibility patches to asyncssh for real-world clients, applied once at import.

* paramiko sends ``SERVICE_REQUEST ssh-userauth`` again before every authentication attempt
  after a failure; OpenSSH's sshd accepts that, asyncssh disconnects ("Unexpected service").
  The patch answers a repeated ``ssh-userauth`` request with ``SERVICE_ACCEPT`` while user
  authentication is still in progress, so such clients can retry (and ``max_auth_tries`` counts
  each attempt).
* asyncssh keeps received bytes in one ``bytes`` buffer and slices the rest of it off after
  every packet, so a large read holding many packets is copied over and over (quadratic; with
  uvloop's 256 KiB reads that was 16% of the gateway's CPU during uploads). The patch gives it
  a buffer (:class:`_InputBuffer`) whose tail slices are views, not copies; the leftover of a
  read (less than one packet) is copied once when the next read arrives.
* asyncssh sends an empty ``SSH_MSG_IGNORE`` before every packet, a countermeasure against
  plaintext recovery in CBC mode (CVE-2008-5161) that OpenSSH does not use with other modes. It
  doubles the packets, encryptions and socket writes of every SFTP request and reply. The patch
  drops it unless the connection's send cipher is a CBC mode (relayd never offers one).
* asyncssh's logger formats every debug message's arguments before the logging level is
  checked (one per SFTP request), and its packet logger names and measures every packet before
  its logger looks at the debug level; the patches check the level first.
* Client connections (the relay's destinations) write each packet to the socket as it is made;
  with many deliveries sharing a connection that is one system call per packet. The patch
  gathers the packets made in one event-loop turn into one write (flushed on the next turn).
  Server connections keep writing at once (measured: gathering did not help ingest).
"""

from __future__ import annotations

from typing import Any


import logging as _logging

from asyncssh import connection as _conn
from asyncssh import packet as _packet
from asyncssh import logging as _sshlog
from asyncssh import sftp as _sftp
from asyncssh.packet import SSHPacket, String

__all__ = ["install"]

_USERAUTH = b"ssh-userauth"
_EMPTY_STRING = String(b"")


class _InputBuffer:
    """The few ``bytes`` operations asyncssh uses on its input buffer, with copy-free tails.

    ``buf[a:]`` returns another view; ``buf[:b]``/``buf[a:b]`` return real ``bytes``;
    ``buf + data`` keeps only the unconsumed part.
    """

    __slots__ = ("_data", "_start")

    def __init__(self, data: bytes, start: int = 0):
        self._data = data
        self._start = start

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self._data) > self._start

    def __getitem__(self, key: slice) -> Any:
        if not isinstance(key, slice) or key.step is not None:
            raise TypeError("_InputBuffer supports plain slices only")
        a = 0 if key.start is None else key.start
        if a < 0 or (key.stop is not None and key.stop < 0):
            return bytes(self)[key]
        if key.stop is None:
            return _InputBuffer(self._data, min(self._start + a, len(self._data)))
        return self._data[self._start + a:self._start + key.stop]

    def __add__(self, other: bytes) -> "_InputBuffer":
        if self._start >= len(self._data):
            return _InputBuffer(bytes(other))
        return _InputBuffer(self._data[self._start:] + other)

    def __bytes__(self) -> bytes:
        return self._data[self._start:]

    def __eq__(self, other: object) -> bool:
        return bytes(self) == other

    __hash__ = None  # type: ignore[assignment]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        stop = len(self._data) if end is None else min(len(self._data), self._start + end)
        idx = self._data.find(sub, self._start + start, stop)
        return idx - self._start if idx >= 0 else -1
class _LazyHideEmpty:
    """asyncssh's ``hide_empty(attrs)`` log argument, formatted only when the message is logged."""

    __slots__ = ("value", "prefix")

    def __init__(self, value: object, prefix: str = ", ") -> None:
        self.value = value
        self.prefix = prefix

    def __str__(self) -> str:
        text = str(self.value)
        return self.prefix + text if text else ""


_installed = False


def install() -> None:
    """Install the patches (idempotent)."""
    global _installed
    if _installed:
        return
    handlers: dict[int, Any] = _conn.SSHConnection._packet_handlers  # type: ignore[assignment]
    original = handlers[_conn.MSG_SERVICE_REQUEST]

    def process_service_request(self: Any, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        if (self.is_server() and self._next_service is None and self._auth_in_progress
                and not self._auth_complete and self._recv_encryption):
            service = packet.get_string()
            packet.check_end()
            if service == _USERAUTH:
                self.send_packet(_conn.MSG_SERVICE_ACCEPT, String(service))
                return
            raise _conn.ServiceNotAvailable("Unexpected service in service request")
        original(self, pkttype, pktid, packet)

    handlers[_conn.MSG_SERVICE_REQUEST] = process_service_request

    def data_received(self: Any, data: bytes, datatype: Any = None) -> None:
        buf = self._inpbuf
        if not isinstance(buf, _InputBuffer):
            buf = _InputBuffer(bytes(buf))
        self._inpbuf = buf + data
        self._recv_data()

    _conn.SSHConnection.data_received = data_received  # type: ignore[method-assign]
    _install_send_patches()
    _installed = True


def _send_cbc(conn: Any) -> bool:
    """Whether ``conn`` encrypts what it sends with a CBC-mode cipher."""
    alg = conn._enc_alg_cs if conn.is_client() else conn._enc_alg_sc
    return b"cbc" in (alg or b"")


def _install_send_patches() -> None:
    send_packet = _conn.SSHConnection.send_packet

    def send_packet_without_ignore(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype == _conn.MSG_IGNORE and handler is None and len(args) == 1 and args[0] == _EMPTY_STRING
                and not _send_cbc(self)):
            return
        send_packet(self, pkttype, *args, handler=handler)

    _conn.SSHConnection.send_packet = send_packet_without_ignore  # type: ignore[method-assign]

    log = _sshlog.SSHLogger.log

    def log_if_enabled(self: Any, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            log(self, level, msg, *args, **kwargs)

    _sshlog.SSHLogger.log = log_if_enabled  # type: ignore[method-assign]

    log_packet = _packet.SSHPacketLogger._log_packet

    def log_packet_if_enabled(self: Any, msg: str, pkttype: int, pktid: Any, packet: Any, note: str) -> None:
        # asyncssh formats the packet's name and size before its logger looks at the level.
        if self.logger._debug_level >= 3 and self.logger.isEnabledFor(_logging.DEBUG):
            log_packet(self, msg, pkttype, pktid, packet, note)

    _packet.SSHPacketLogger._log_packet = log_packet_if_enabled  # type: ignore[method-assign]
    _sftp.hide_empty = _LazyHideEmpty  # type: ignore[assignment]  # formatted only if logged

    send = _conn.SSHConnection._send

    def gathered_send(self: Any, data: bytes) -> None:
        transport = self._transport
        if not self.is_client() or not transport:
            send(self, data)
            return
        pending: list[bytes] | None = self.__dict__.get("_relayd_pending")
        if pending is None:
            pending = self._relayd_pending = []
        if not pending:
            # Scheduled before any abort that asyncssh schedules later (call_soon is FIFO), so a
            # DISCONNECT still goes out first, as without the patch.
            self._loop.call_soon(_flush, pending, transport)
        pending.append(data)

    _conn.SSHConnection._send = gathered_send  # type: ignore[method-assign]


def _flush(pending: list[bytes], transport: Any) -> None:
    if not pending:
        return
    data = b"".join(pending) if len(pending) > 1 else pending[0]
    pending.clear()
    try:
        transport.write(data)
    except ConnectionError:  # as asyncssh's own _send
        pass
