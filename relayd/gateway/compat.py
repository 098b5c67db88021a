"""Compatibility patches to asyncssh for real-world clients, applied once at import.

* paramiko sends ``SERVICE_REQUEST ssh-userauth`` again before every authentication attempt
  after a failure; OpenSSH's sshd accepts that, asyncssh disconnects ("Unexpected service").
  The patch answers a repeated ``ssh-userauth`` request with ``SERVICE_ACCEPT`` while user
  authentication is still in progress, so such clients can retry (and ``max_auth_tries`` counts
  each attempt).
"""

from __future__ import annotations

from typing import Any

from asyncssh import connection as _conn
from asyncssh.packet import SSHPacket, String

__all__ = ["install"]

_USERAUTH = b"ssh-userauth"
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
    _installed = True
