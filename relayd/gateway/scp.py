"""Legacy SCP protocol (``scp -t``/``scp -f`` over exec) on top of the tenant SFTP view.

OpenSSH clients before 9.0 (and ``scp -O`` today) speak the old SCP protocol. asyncssh's SCP
server drives an :class:`~asyncssh.SFTPServer`, so every path, permission and quota rule of
:class:`~relayd.gateway.sftp.TenantSFTPServer` applies unchanged. One difference from asyncssh's
stock sink: it closes (for relayd: *commits*) a file even when the transfer was cut short. Ours
commits only after every byte arrived and the client confirmed the file; otherwise the upload
is aborted and nothing is committed.
"""

from __future__ import annotations

import logging
from typing import Any

from asyncssh.scp import _SCPArgParser, _scp_error, _SCPSink, _SCPSource  # noqa: PLC2701
from asyncssh.sftp import SFTPConnectionLost, SFTPError, SFTPServerFS
from asyncssh.stream import SSHReader, SSHWriter

from relayd.gateway.sftp import TenantSFTPServer

__all__ = ["is_scp_command", "run_scp"]

log = logging.getLogger("relayd.gateway.scp")


def is_scp_command(command: str) -> bool:
    """True for an ``scp -t``/``scp -f`` server command that parses."""
    if not command.startswith("scp "):
        return False
    try:
        _SCPArgParser().parse(command)
    except ValueError:
        return False
    return True


class _CommitOnCompleteSink(_SCPSink):
    """SCP receive side that commits a file only once it fully arrived and was confirmed."""

    def __init__(self, tenant_server: TenantSFTPServer, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._tenant_server = tenant_server

    async def _recv_file(self, srcpath: bytes, dstpath: bytes, size: int) -> None:
        file_obj: Any = await self._fs.open(dstpath, "wb")
        local_exc: Exception | None = None
        committed = False
        offset = 0
        try:
            self.send_ok()
            while offset < size:
                data = await self.recv_data(min(size - offset, self._block_size))
                if not data:
                    raise _scp_error(SFTPConnectionLost, "Connection lost", fatal=True, suppress_send=True)
                if not local_exc:
                    try:
                        await file_obj.write(data, offset)
                    except (OSError, SFTPError) as exc:
                        local_exc = exc
                offset += len(data)
            remote_exc = await self.await_response()
            if not local_exc and not remote_exc:
                try:
                    await file_obj.close()  # the commit
                    committed = True
                except (OSError, SFTPError) as exc:
                    local_exc = exc
        finally:
            if not committed:
                self._tenant_server.abort(file_obj._file_obj)  # noqa: SLF001
        if local_exc:
            self.send_error(local_exc)
            local_exc.suppress_send = True  # type: ignore[attr-defined]
        else:
            self.send_ok()
        final_exc = remote_exc or local_exc
        if final_exc:
            raise final_exc


async def run_scp(server: TenantSFTPServer, command: str, reader: SSHReader[bytes],
                  writer: SSHWriter[bytes]) -> None:
    """Serve one ``scp -t``/``scp -f`` command for an authenticated user."""
    args = _SCPArgParser().parse(command)
    fs = SFTPServerFS(server)
    handler: Any
    if args.source:
        handler = _SCPSource(fs, reader, writer, args.preserve, args.recurse, error_handler=False, server=True)
    else:
        handler = _CommitOnCompleteSink(server, fs, reader, writer, args.must_be_dir, args.preserve,
                                        args.recurse, error_handler=False, server=True)
    log.info("scp %s conn=%s user=%s", "download" if args.source else "upload", server.ident.conn_id,
             server.ident.user.name)
    try:
        await handler.run(args.path)
    finally:
        server.exit()
