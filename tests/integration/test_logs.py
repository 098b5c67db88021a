"""``relayd serve --log-format json``: every line of a whole daemon run is one ECS-style JSON
object, events carry ``event.*`` fields, and no password ever reaches the log."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import argon2
import paramiko
import pytest
import yaml

from tests.conftest import two_tenants
from tests.helpers import Key, base_config, free_port, paramiko_session, relayd, run_daemon, wait_for

GOOD_PASSWORD = "canary-good-pw-4f1d2c"
BAD_PASSWORD = "canary-bad-pw-9e7a51"
LEVELS = {"debug", "info", "warning", "error", "critical"}


def parse(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "empty log"
    docs = []
    for n, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"log line {n} is not JSON: {line!r}") from None
        assert isinstance(doc, dict), line
        docs.append(doc)
    return docs


def test_json_log_of_a_whole_run(tmp_path: Path, keys: dict[str, Key]) -> None:
    tenants = two_tenants(keys, routes=[{"match": "**", "to": ["archive"]}])
    tenants["acme"]["users"].append({"name": "acme-pw", "password_hash": argon2.PasswordHasher().hash(GOOD_PASSWORD),
                                     "permissions": ["upload", "list"]})
    cfg = base_config(tmp_path, free_port(), tenants)
    cfg["destinations"] = {"archive": {"type": "local", "path": str(tmp_path / "archive")}}
    with run_daemon(tmp_path, cfg, serve_args=("--log-format", "json")) as d:
        # A failed password login, then a good one that uploads a file (delivered to archive).
        transport = paramiko.Transport(("127.0.0.1", d.port))
        try:
            transport.start_client(timeout=10)
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password("acme-pw", BAD_PASSWORD)
        finally:
            transport.close()
        with paramiko_session(d, "acme-pw", password=GOOD_PASSWORD) as sftp:
            with sftp.open("/report.csv", "wb") as f:
                f.write(b"a,b\n1,2\n")
        wait_for(lambda: d.transfers() and d.transfers()[0]["deliveries"][0]["state"] == "delivered",
                 what="delivered")
        # A rejected reload (an error line), a good one, then stop.
        d.config_path.write_text("node: [broken")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in d.log(), what="rejected reload")
        d.config_path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in d.log(), what="reload")
        assert d.stop() == 0
        text = d.log()

    docs = parse(text)
    for doc in docs:
        for key in ("@timestamp", "log.level", "message", "log.logger", "process.pid"):
            assert key in doc, (key, doc)
        assert doc["log.level"] in LEVELS, doc
        assert doc["process.pid"] == d.proc.pid
        assert doc["log.logger"].startswith(("relayd", "asyncssh", "asyncio", "py.warnings")), doc
        assert doc["@timestamp"].endswith("+00:00") and "T" in doc["@timestamp"]
        assert "\n" not in doc["message"] or "error.stack_trace" in doc

    def events(action: str, outcome: str) -> list[dict[str, Any]]:
        return [x for x in docs if x.get("event.action") == action and x.get("event.outcome") == outcome]

    failed = events("login", "failure")
    assert failed and failed[0]["user.name"] == "acme-pw" and failed[0]["source.ip"] == "127.0.0.1"
    assert failed[0]["event.category"] == "authentication" and failed[0]["log.level"] == "warning"
    ok = events("login", "success")
    assert ok and ok[0]["user.name"] == "acme-pw" and ok[0]["relayd.auth_method"] == "password"
    committed = events("file-committed", "success")
    assert committed and committed[0]["file.size"] == 8 and committed[0]["relayd.tenant"] == "acme"
    delivered = events("delivery", "success")
    assert delivered and delivered[0]["relayd.destination"] == "archive"
    assert delivered[0]["relayd.transfer_id"] == committed[0]["relayd.transfer_id"]
    assert events("config-reload", "failure")[0]["log.level"] == "error"
    assert events("config-reload", "success")
    assert events("start", "success") and events("stop", "success")
    assert docs[-1]["message"] == "stopped"

    # No secret, in any form, anywhere in the log.
    for secret in (GOOD_PASSWORD, BAD_PASSWORD):
        assert secret not in text
        assert secret.encode().hex() not in text
    assert "$argon2id$" not in text


def test_serve_errors_are_json_too(tmp_path: Path, keys: dict[str, Key]) -> None:
    """A config error at start is a JSON line as well (exit 2), not plain text on stderr."""
    cfg = base_config(tmp_path, free_port(), two_tenants(keys))
    cfg["gateway"]["max_auth_tries"] = 0
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = relayd("serve", "-c", str(path), "--log-format", "json")
    assert r.returncode == 2
    docs = parse(r.stderr)
    assert docs[0]["log.level"] == "error" and docs[0]["message"].startswith("gateway.max_auth_tries:")
    assert docs[0]["event.action"] == "start" and docs[0]["event.outcome"] == "failure"
