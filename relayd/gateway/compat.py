"""Compatibility patches to asyncssh for real-world clients, applied once at import.

* paramiko sends ``SERVICE_REQUEST ssh-userauth`` again before every authentication attempt
  after a failure; OpenSSH's sshd accepts that, asyncssh disconnects ("Unexpected service").
  The patch answers a repeated ``ssh-userauth`` request with ``SERVICE_ACCEPT`` while user
  authentication is still in progress, so such clients can retry (and ``max_auth_tries`` counts
  each attempt).
* asyncssh keeps received bytes in one ``bytes`` buffer and slices the rest of it off after
  every packet, so a large read holding many packets is copied over and over (quadratic; with
  uvloop's 256 KiB reads that was 16% of the gateway's CPU during uploads). Feeding it the data
  in pieces of at most ``_PIECE`` bytes keeps each copy small; to asyncssh this is the same as
  the data arriving in smaller TCP segments.
"""

from __future__ import annotations

from typing import Any

from asyncssh import connection as _conn
from asyncssh.packet import SSHPacket, String

__all__ = ["install"]

_USERAUTH = b"ssh-userauth"
_PIECE = 32 * 1024
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

    data_received = _conn.SSHConnection.data_received

    def data_received_in_pieces(self: Any, data: bytes, datatype: Any = None) -> None:
        if len(data) <= _PIECE:
            data_received(self, data, datatype)
            return
        view = memoryview(data)
        for start in range(0, len(data), _PIECE):
            data_received(self, bytes(view[start:start + _PIECE]), datatype)

    _conn.SSHConnection.data_received = data_received_in_pieces  # type: ignore[method-assign]
    _installed = True
