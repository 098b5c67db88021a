"""SFTP protocol handler and SSH session glue (asyncssh subclasses).

Differences from asyncssh's stock server handler, each for a reason found with real clients
(see ../shared/notes/asyncssh.md):

* a handle still open when the session ends is *aborted*, never closed: only a close the client
  sent on a live session commits;
* WRITE packets with trailing padding (rclone) are accepted, as OpenSSH does;
* the session ends with exit status 0 so OpenSSH ``scp`` reports success;
* open/opendir are bounded per session, opendir errors come at opendir time;
* limits@openssh.com advertises OpenSSH's sizes; copy-data and ranges extensions are not offered;
* check-file-handle / check-file-name (and paramiko's ``check-file``) answer file digests, and an
  exec of exactly ``sha256sum|sha1sum|md5sum <path>`` is answered in-process (see checksum.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, cast

import asyncssh
from asyncssh.packet import Byte, PacketDecodeError, SSHPacket, UInt32
from asyncssh.sftp import (FXP_EXTENDED_REPLY, FXP_OPEN, FXP_OPENDIR, FXP_WRITE, SFTPLimits,
                           SFTPServerHandler)
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from relayd.gateway.checksum import (ADVERTISED, CheckFileReply, ChecksumCommand, CommandRefused, check_file,
                                     parse_checksum_command, run_checksum)
from relayd.gateway.scp import is_scp_command, run_scp
from relayd.gateway.peer import serve_peer
from relayd.peerproto import SUBSYSTEM as PEER_SUBSYSTEM
from relayd.gateway.sftp import MAX_READ, TenantSFTPServer

__all__ = ["RelaydSFTPHandler", "SFTPOnlySession"]

log = logging.getLogger("relayd.gateway.session")

SFTP_VERSION = 3


class RelaydSFTPHandler(SFTPServerHandler):
    """asyncssh's SFTP server handler with relayd's commit, limit and compatibility rules."""

    _extensions = [(name, data) for name, data in SFTPServerHandler._extensions
                   if name not in (b"copy-data", b"ranges@asyncssh.com", b"hardlink@openssh.com")]
    _extensions += [(b"check-file-handle", ADVERTISED), (b"check-file-name", ADVERTISED)]
    _return_types = {**SFTPServerHandler._return_types, b"check-file": FXP_EXTENDED_REPLY,
                     b"check-file-handle": FXP_EXTENDED_REPLY, b"check-file-name": FXP_EXTENDED_REPLY}

    def __init__(self, server: TenantSFTPServer, reader: SSHReader[bytes], writer: SSHWriter[bytes],
                 max_handles: int):
        super().__init__(server, reader, writer, SFTP_VERSION)
        self._relayd_server = server
        self._max_handles = max_handles
        self._out: list[bytes] = []
        self._out_scheduled = False

    def send_packet(self, pkttype: int, pktid: int | None, *args: bytes) -> None:
        """Queue a reply; replies made in one event-loop turn leave in one channel write."""
        writer = self._writer
        if writer is None:
            raise asyncssh.SFTPNoConnection("Connection not open")
        if writer.channel.is_closing():
            return
        payload = Byte(pkttype) + b"".join(args)
        self._out.append(UInt32(len(payload)) + payload)
        if not self._out_scheduled:
            self._out_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._out_scheduled = False
        out, self._out = self._out, []
        writer = self._writer
        if out and writer is not None and not writer.channel.is_closing():
            writer.write(b"".join(out))

    async def _process_packet(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        self._relayd_server.last_activity = time.monotonic()
        await SFTPServerHandler._process_packet(self, pkttype, pktid, packet)

    def _check_handles(self) -> None:
        if len(self._file_handles) + len(self._dir_handles) >= self._max_handles:
            log.warning("refused: too many open handles conn=%s", self._relayd_server.ident.conn_id)
            raise asyncssh.SFTPFailure(f"Too many open handles (limit {self._max_handles})")

    async def _process_open(self, packet: SSHPacket) -> bytes:
        self._check_handles()
        return await SFTPServerHandler._process_open(self, packet)

    async def _process_opendir(self, packet: SSHPacket) -> bytes:
        self._check_handles()
        path = packet.get_string()
        packet.check_end()
        await self._relayd_server.check_dir(path)
        handle = self._get_next_handle()
        self._dir_handles[handle] = self._relayd_server.scandir(path)
        return handle

    async def _process_write(self, packet: SSHPacket) -> int:
        handle = packet.get_string()
        offset = packet.get_uint64()
        length = packet.get_uint32()
        # The data is passed on as a view of the packet (no copy of up to 256 KiB per WRITE).
        start = packet._idx  # noqa: SLF001 - asyncssh's SSHPacket read position
        if start + length > packet._len:  # noqa: SLF001
            raise PacketDecodeError("Incomplete packet")
        data = memoryview(packet._packet)[start:start + length]  # noqa: SLF001
        # No check_end(): rclone pads its last WRITE packet; OpenSSH ignores trailing bytes.
        file_obj = self._file_handles.get(handle)
        if not file_obj:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return self._relayd_server.write(file_obj, offset, data)

    async def _process_limits(self, packet: SSHPacket) -> SFTPLimits:
        packet.check_end()
        return SFTPLimits(MAX_READ + 1024 + 4, MAX_READ, MAX_READ, self._max_handles)

    async def _process_check_file_handle(self, packet: SSHPacket) -> CheckFileReply:
        handle = packet.get_string()
        offered, start, length, block_size = self._check_file_args(packet)
        file_obj = self._file_handles.get(handle)
        if file_obj is None:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return await check_file(self._relayd_server, file_obj, offered, start, length, block_size)

    async def _process_check_file_name(self, packet: SSHPacket) -> CheckFileReply:
        path = packet.get_string()
        offered, start, length, block_size = self._check_file_args(packet)
        return await check_file(self._relayd_server, path, offered, start, length, block_size)

    @staticmethod
    def _check_file_args(packet: SSHPacket) -> tuple[str, int, int, int]:
        offered = packet.get_string().decode("ascii", "replace")
        start = packet.get_uint64()
        length = packet.get_uint64()
        block_size = packet.get_uint32()
        packet.check_end()
        return offered, start, length, block_size

    _packet_handlers: dict[Any, Any] = {  # type: ignore[assignment]
        key: fn for key, fn in SFTPServerHandler._packet_handlers.items()
        if key not in (b"copy-data", b"ranges@asyncssh.com")
    }
    _packet_handlers[FXP_OPEN] = _process_open
    _packet_handlers[FXP_OPENDIR] = _process_opendir
    _packet_handlers[FXP_WRITE] = _process_write
    _packet_handlers[b"limits@openssh.com"] = _process_limits
    _packet_handlers[b"check-file"] = _process_check_file_handle   # paramiko's SFTPFile.check()
    _packet_handlers[b"check-file-handle"] = _process_check_file_handle
    _packet_handlers[b"check-file-name"] = _process_check_file_name

    async def _cleanup(self, exc: Exception | None) -> None:
        self._flush_out()
        server = self._relayd_server
        for file_obj in list(self._file_handles.values()):
            server.abort(file_obj)
        self._file_handles = {}
        self._dir_handles = {}
        server.exit()
        writer = self._writer
        if exc is None and writer is not None:
            chan = cast(asyncssh.SSHServerChannel[bytes], writer.channel)
            if not chan.is_closing():
                try:
                    chan.exit(0)
                except (OSError, asyncssh.Error):
                    pass
        await SFTPServerHandler._cleanup(self, exc)


class SFTPOnlySession(SSHServerStreamSession):
    """An SSH session channel that offers the ``sftp`` subsystem, legacy ``scp`` and the checksum
    commands (nothing else)."""

    def __init__(self, make_server: Callable[[asyncssh.SSHServerChannel], TenantSFTPServer],
                 max_handles: int, conn_id: str, on_close: Callable[[], None], user: str = "",
                 peer: bool = False):
        super().__init__(None, make_server, SFTP_VERSION, False)  # type: ignore[arg-type]
        self._make_server = make_server
        self._max_handles = max_handles
        self._conn_id = conn_id
        self._who = f"conn={conn_id} user={user}" if user else f"conn={conn_id}"
        self._on_close = on_close
        self._checksum: ChecksumCommand | None = None
        self._peer_allowed = peer
        self._peer = False

    def pty_requested(self, *args: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        log.warning("refused: shell request conn=%s", self._conn_id)
        return False

    def exec_requested(self, command: str) -> bool:
        if is_scp_command(command):
            log.info("exec scp %s command=%r", self._who, command[:200])
            return True
        try:
            self._checksum = parse_checksum_command(command)
        except CommandRefused as exc:
            log.warning("refused: exec request %s command=%r (%s)", self._who, command[:200], exc)
            return False
        log.info("exec checksum %s command=%r", self._who, command[:200])
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == "sftp":
            return True
        if subsystem == PEER_SUBSYSTEM:
            if self._peer_allowed:
                self._peer = True
                log.info("peer session %s", self._who)
                return True
            log.warning("refused: peer subsystem without the peer permission %s", self._who)
            return False
        log.warning("refused: subsystem %r conn=%s", subsystem[:100], self._conn_id)
        return False

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None and self._conn is not None
        chan.set_encoding(None)
        self._encoding = None
        reader: SSHReader[bytes] = SSHReader(self, chan)
        writer: SSHWriter[bytes] = SSHWriter(self, chan)
        server = self._make_server(cast(asyncssh.SSHServerChannel[bytes], chan))
        command = chan.get_command()
        if self._peer:
            self._conn.create_task(serve_peer(server, reader, writer, cast(asyncssh.SSHServerChannel[bytes], chan)),
                                   reader.logger)
            return
        if self._checksum is not None:
            self._conn.create_task(run_checksum(server, self._checksum, cast(asyncssh.SSHServerChannel[bytes], chan)),
                                   reader.logger)
            return
        if command:
            self._conn.create_task(run_scp(server, command, reader, writer), reader.logger)
            return
        handler = RelaydSFTPHandler(server, reader, writer, self._max_handles)
        self._conn.create_task(handler.run(), reader.logger)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._on_close()
