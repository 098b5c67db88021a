"""The ``relayd`` command: serve, check-config, status, transfers, show, retry, cancel, keys,
manifest, verify, receipt, hash-password, init-demo.

Errors are mapped to exit codes in one place (:func:`main`): a bad config prints one line per
problem and exits 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from relayd.config import ConfigError, load_config
from relayd.integrity.keys import SigningKeyError
from relayd.journal import JournalError

__all__ = ["main"]


class _JsonFormatter(logging.Formatter):
    """One JSON object per line with ECS-style field names (dotted keys, as ECS loggers write).

    Always: ``@timestamp``, ``log.level``, ``log.logger``, ``message``, ``process.pid``,
    ``process.thread.name``, ``service.name``, ``ecs.version``. Log calls add ECS fields
    (``event.action``, ``event.category``, ``event.outcome``, ``user.name``, ``source.ip``,
    ``file.size``, ...) and ``relayd.*`` ids through ``extra={...}``: every ``extra`` key with a
    dot in its name is copied. Secrets are never passed to the logger, so none can appear here.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "log.level": record.levelname.lower(),
            "message": record.getMessage(),
            "log.logger": record.name,
            "process.pid": record.process,
            "process.thread.name": record.threadName,
            "service.name": "relayd",
            "ecs.version": "8.11.0",
        }
        for key, value in record.__dict__.items():
            if "." in key:
                doc[key] = value
        if record.exc_info:
            exc = record.exc_info[1]
            if exc is not None:
                doc["error.type"] = type(exc).__name__
                doc["error.message"] = str(exc)
            doc["error.stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr (journald picks it up), one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)  # Python warnings become log lines too (JSON when asked)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon. Every problem, even a config error at start, is a log line (so that
    ``--log-format json`` output is JSON from the first line to the last)."""
    from relayd.daemon import DaemonError, run

    setup_logging(args.log_level, args.log_format)
    log = logging.getLogger("relayd.cli")
    try:
        return run(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line, extra={"event.action": "start", "event.outcome": "failure"})
        return exc.exit_code
    except (DaemonError, JournalError, SigningKeyError) as exc:
        log.error("cannot start: %s", exc, extra={"event.action": "start", "event.outcome": "failure"})
        return exc.exit_code if isinstance(exc, (DaemonError, JournalError)) else 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        log.error("cannot start: %s%s", exc.strerror or exc, where,
                  extra={"event.action": "start", "event.outcome": "failure"})
        return 1
    except Exception:  # noqa: BLE001 - a bug: still one (JSON) log line, with the stack trace in it
        log.critical("relayd crashed", exc_info=True)
        return 70


def _cmd_check_config(args: argparse.Namespace) -> int:
    from relayd.ingest.check import check_dropfolders

    config = load_config(args.config)
    check_dropfolders(config)  # folders must exist on this host, as at start
    print("config OK")
    return 0


def _cmd_transfers(args: argparse.Namespace) -> int:
    from relayd.daemon import journal_path
    from relayd.journal import Journal

    from relayd.admin import run_as_state_owner

    config = load_config(args.config)
    run_as_state_owner(config)
    journal = Journal.open(journal_path(config), readonly=True)
    try:
        rows = journal.list_transfers(tenant=args.tenant, state=args.state, since=args.since)
        deliveries = journal.deliveries_for([t.id for t in rows])
    finally:
        journal.close()
    if args.json:
        json.dump([{**t.to_dict(), "unrouted": not deliveries[t.id],
                    "deliveries": [d.to_dict() for d in deliveries[t.id]]} for t in rows], sys.stdout, indent=2)
        print()
        return 0
    headers = ("ID", "RECEIVED", "TENANT", "USER", "STATE", "SIZE", "SHA256", "PATH", "DELIVERIES")
    table = [(t.id, t.received_at[:19].replace("T", " "), t.tenant, t.user, t.state, _human(t.size),
              t.sha256[:12], t.path, _delivery_summary(deliveries[t.id])) for t in rows]
    widths = [max(len(str(r[i])) for r in [headers, *table]) for i in range(len(headers))]
    print("  ".join(str(v).ljust(w) for v, w in zip(headers, widths)).rstrip())
    for t, row in zip(rows, table):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        for d in deliveries[t.id]:
            if d.last_error and d.state != "delivered":
                print(f"    {d.destination}: {d.state} after {d.attempts} attempt(s): {d.last_error}")
    if not rows:
        print("(no transfers)")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    import time

    from relayd.daemon import journal_path
    from relayd.journal import Journal

    from relayd.admin import run_as_state_owner

    config = load_config(args.config)
    run_as_state_owner(config)
    journal = Journal.open(journal_path(config))
    try:
        rows = journal.requeue(args.id, time.time())
    finally:
        journal.close()
    if not rows:
        print(f"relayd: no delivery or transfer with id {args.id}", file=sys.stderr)
        return 1
    for d in rows:
        print(f"{d.id}  {d.destination}  {d.state}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from relayd.admin import format_status, status

    info = status(load_config(args.config))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_status(info))
    running = info["daemon"]["running"]
    return 0 if running else 4 if running is None else 3  # LSB status codes: 3 not running, 4 unknown


def _cmd_show(args: argparse.Namespace) -> int:
    from relayd.admin import UnknownId, format_show, show

    try:
        info = show(load_config(args.config), args.id)
    except UnknownId as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_show(info))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from relayd.admin import UnknownId, cancel, format_cancel

    try:
        changed, rows, _ = cancel(load_config(args.config), args.id)
    except UnknownId as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"cancelled": changed, "deliveries": [d.to_dict() for d in rows]}, indent=2))
    else:
        print(format_cancel(changed, rows))
    return 0


def _delivery_summary(deliveries: list[Any]) -> str:
    if not deliveries:
        return "unrouted"
    parts = []
    for d in deliveries:
        extra = f" x{d.attempts}" if d.attempts > 1 else ""
        parts.append(f"{d.destination}:{d.state}{extra}")
    return " ".join(parts)


def _human(n: int) -> str:
    from relayd.admin import human_size

    return human_size(n)


def _cmd_keys_show(args: argparse.Namespace) -> int:
    from relayd.integrity.admin import show_keys

    info = show_keys(load_config(args.config).node.state_dir, create=args.create)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(info.text())
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from relayd.integrity.admin import rotate_keys

    old, info = rotate_keys(load_config(args.config).node.state_dir)
    if args.json:
        print(json.dumps({**info.to_dict(), "previous": old}, indent=2))
        return 0
    print(f"new signing key: {info.current_id}")
    print(f"previous key {old}: private key deleted, public key kept (its manifests still verify)")
    print("the running daemon signs with the new key after a reload: systemctl reload relayd")
    print(f"give partners the new public key: relayd keys export -c {args.config} DIR")
    return 0


def _cmd_keys_export(args: argparse.Namespace) -> int:
    from relayd.integrity.admin import export_keys

    for path in export_keys(load_config(args.config).node.state_dir, Path(args.dir), pem=args.pem):
        print(path)
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from relayd.daemon import journal_path
    from relayd.integrity.manifest import SIDECAR_SUFFIX, read_hmac_key, sidecar_bytes
    from relayd.journal import Journal

    config = load_config(args.config)
    try:
        hmac_key = read_hmac_key(Path(args.hmac_key_file)) if args.hmac_key_file else None
    except ValueError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    journal = Journal.open(journal_path(config), readonly=True)
    try:
        transfer = journal.get_transfer(args.transfer_id)
        signed = journal.manifest_of(args.transfer_id) if transfer is not None else None
    finally:
        journal.close()
    if transfer is None:
        print(f"relayd: no transfer with id {args.transfer_id}", file=sys.stderr)
        return 1
    if signed is None:
        print(f"relayd: transfer {args.transfer_id} has no signed manifest (committed while "
              "integrity.manifests was off, or by a relayd without manifests)", file=sys.stderr)
        return 1
    data = sidecar_bytes(signed, hmac_key)
    if args.output in (None, "-"):
        sys.stdout.write(data.decode("utf-8"))
        return 0
    out = Path(args.output)
    if out.is_dir():
        out = out / (Path(transfer.path).name + SIDECAR_SUFFIX)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    print(out, file=sys.stderr)
    return 0


def _cmd_receipt(args: argparse.Namespace) -> int:
    from relayd.daemon import journal_path
    from relayd.journal import Journal

    config = load_config(args.config)
    journal = Journal.open(journal_path(config), readonly=True)
    try:
        delivery = journal.get_delivery(args.delivery_id)
    finally:
        journal.close()
    if delivery is None:
        print(f"relayd: no delivery with id {args.delivery_id}", file=sys.stderr)
        return 1
    if not delivery.receipt:
        print(f"relayd: delivery {args.delivery_id} has no receipt (state {delivery.state}; only deliveries to "
              "a relayd destination get one)", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.write(delivery.receipt)
    else:
        Path(args.output).write_text(delivery.receipt)
        print(f"wrote {args.output}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from relayd.integrity.admin import verify, verify_receipt_file

    try:
        if args.receipt:
            ok, line = verify_receipt_file(Path(args.receipt), Path(args.file) if args.file else None,
                                           [Path(k) for k in args.pubkey or ()],
                                           Path(args.keys) if args.keys else None)
        elif not args.file:
            ok, line = False, "FAIL unreadable: give FILE (or --receipt R)"
        else:
            ok, line = verify(Path(args.file), Path(args.manifest) if args.manifest else None,
                              [Path(k) for k in args.pubkey or ()], Path(args.keys) if args.keys else None,
                              Path(args.hmac_key_file) if args.hmac_key_file else None)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        ok, line = False, f"FAIL unreadable: unexpected {type(exc).__name__}: {exc}".replace("\n", " ")
    print(line)
    return 0 if ok else 1


def _cmd_hash_password(args: argparse.Namespace) -> int:
    import argon2

    password = sys.stdin.readline().rstrip("\n") if args.stdin else getpass.getpass("Password: ")
    if not password:
        print("relayd: empty password refused", file=sys.stderr)
        return 2
    print(argon2.PasswordHasher().hash(password))
    return 0


def _cmd_init_demo(args: argparse.Namespace) -> int:
    from relayd.demo import init_demo, sftp_command

    cfg = init_demo(Path(args.dir), port=args.port, force=args.force)
    print(f"demo config: {cfg}")
    print("upload a file from another terminal (in this folder) with:")
    print(f"  {sftp_command(Path(args.dir), args.port)}")
    print(f"then see it with: .venv/bin/relayd transfers -c {cfg}")
    print(f"               or: .venv/bin/relayd status -c {cfg}")
    print("      and metrics: curl -s http://127.0.0.1:9464/metrics | grep '^relayd_'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``relayd`` command."""
    p = argparse.ArgumentParser(prog="relayd", description="SFTP/SSH bulk-transfer relay")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn: Any, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if config:
            sp.add_argument("-c", "--config", required=True, metavar="FILE", help="relayd YAML config")
        return sp

    sp = add("serve", "run the gateway in the foreground", _cmd_serve)
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp.add_argument("--log-format", default="text", choices=["text", "json"])
    add("check-config", "validate a config file; exit 2 with one line per problem", _cmd_check_config)
    sp = add("status", "daemon running?, version, node, counts by state, oldest waiting delivery, backlog per "
             "destination (exit 0: running, 3: not running, 4: cannot tell)", _cmd_status)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("transfers", "list committed transfers from the journal", _cmd_transfers)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--tenant")
    sp.add_argument("--state")
    sp.add_argument("--since", help="RFC 3339 time, e.g. 2026-12-01T00:00:00Z")
    sp = add("show", "everything about one transfer or delivery: fields, deliveries, manifest", _cmd_show)
    sp.add_argument("id", metavar="ID", help="a transfer id or a delivery id")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("retry", "re-queue a failed or cancelled delivery (by delivery id, or all of a transfer's by "
             "transfer id)", _cmd_retry)
    sp.add_argument("id", metavar="ID")
    sp = add("cancel", "cancel a pending, retry_wait or failed delivery (by delivery id, or all unfinished ones "
             "of a transfer by transfer id); the daemon never attempts it again", _cmd_cancel)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("keys", "show, rotate or export the manifest signing keys (node.state_dir/signing)", None, False)
    keys = sp.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kp = keys.add_parser("show", help="current key id, its public key (OpenSSH and PEM), kept key ids")
    kp.set_defaults(fn=_cmd_keys_show)
    kp.add_argument("--create", action="store_true", help="create the first key if there is none yet")
    kp = keys.add_parser("rotate", help="make a new current key; older public keys are kept")
    kp.set_defaults(fn=_cmd_keys_rotate)
    kp2 = keys.add_parser("export", help="write every public key as <key id>.pub into DIR (for partners)")
    kp2.set_defaults(fn=_cmd_keys_export)
    kp2.add_argument("dir", metavar="DIR")
    kp2.add_argument("--pem", action="store_true", help="also write <key id>.pem (PEM form, for openssl)")
    for action in keys.choices.values():
        action.add_argument("-c", "--config", required=True, metavar="FILE", help="relayd YAML config")
        if action is not kp2:
            action.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("manifest", "write the signed manifest (sidecar document) of a committed transfer", _cmd_manifest)
    sp.add_argument("transfer_id", metavar="TRANSFER_ID")
    sp.add_argument("-o", "--output", metavar="OUT", help="file or directory to write (default: stdout)")
    sp.add_argument("--hmac-key-file", metavar="F", help="also add an HMAC-SHA256 with this shared key")
    sp = add("verify", "check a file against its signed manifest, offline (no config, no daemon)", _cmd_verify,
             False)
    sp.add_argument("file", metavar="FILE", nargs="?", help="the file (optional with --receipt)")
    sp.add_argument("--manifest", metavar="M", help="sidecar document (default: FILE.relayd.json)")
    sp.add_argument("--receipt", metavar="R", help="check a peer's signed receipt instead (and FILE against "
                    "it, if given); --pubkey/--keys: the receiving gateway's keys")
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--pubkey", action="append", metavar="K", help="a public key (OpenSSH or PEM); repeatable")
    group.add_argument("--keys", metavar="DIR", help="a directory of public keys (*.pub, *.pem)")
    sp.add_argument("--hmac-key-file", metavar="F", help="also require the HMAC with this shared key")
    sp = add("receipt", "write the receipt a peer relayd signed for a delivery", _cmd_receipt)
    sp.add_argument("delivery_id", metavar="DELIVERY_ID")
    sp.add_argument("-o", "--output", metavar="OUT", help="file to write (default: stdout)")
    sp = add("hash-password", "print an argon2id hash for a user's password_hash", _cmd_hash_password, False)
    sp.add_argument("--stdin", action="store_true", help="read the password from standard input")
    sp = add("init-demo", "write a demo config with generated keys", _cmd_init_demo, False)
    sp.add_argument("dir", nargs="?", default="demo")
    sp.add_argument("--port", type=int, default=2222)
    sp.add_argument("--force", action="store_true", help="overwrite an existing demo")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relayd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return exc.exit_code
    except JournalError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return exc.exit_code
    except SigningKeyError as exc:
        print(f"relayd: signing key: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relayd: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
