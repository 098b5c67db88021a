"""Signed manifests end to end through a real daemon: made at commit, delivered as sidecars."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from relayd.integrity import load_public_keys, verify_document, verify_file
from relayd.integrity.manifest import file_digests
from tests.conftest import two_tenants
from tests.helpers import Key, base_config, free_port, make_file, run_daemon, sha256_file, wait_for


def test_manifest_made_at_commit_and_delivered_as_sidecar(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    cfg = base_config(tmp_path, port, two_tenants(keys, routes=[{"match": "**", "to": ["archive", "plain"]}]))
    hmac_file = tmp_path / "sidecar.hmac"
    hmac_file.write_text("partner-shared-secret\n")
    cfg["integrity"] = {"digests": ["sha3-256", "blake2b"]}
    cfg["destinations"] = {
        "archive": {"type": "local", "path": str(tmp_path / "A/{tenant}"), "sidecar": True,
                    "hmac_key_file": str(hmac_file)},
        "plain": {"type": "local", "path": str(tmp_path / "B")},
    }
    with run_daemon(tmp_path / "d", cfg) as d:
        state = Path(cfg["node"]["state_dir"])
        signing = state / "signing"
        src = make_file(tmp_path / "ledger.csv", 2_500_000)
        r = d.sftp(keys["acme"], "acme-erp", f"mkdir /q4\nput {src} /q4/ledger.csv\n")
        assert r.returncode == 0, r.stderr

        def delivered() -> bool:
            rows = [t for t in d.transfers() if t["path"] == "/q4/ledger.csv"]
            return bool(rows) and all(x["state"] == "delivered" for x in rows[0]["deliveries"])
        wait_for(delivered, 30, interval=0.1, what="both deliveries delivered")
        t = next(t for t in d.transfers() if t["path"] == "/q4/ledger.csv")

        # The manifest was stored in the journal with the commit.
        db = sqlite3.connect(state / "journal.db")
        body, = db.execute("SELECT body FROM manifests WHERE transfer_id = ?", (t["id"],)).fetchone()
        db.close()
        stored = json.loads(body)
        assert stored["transfer_id"] == t["id"] and stored["tenant"] == "acme" and stored["user"] == "acme-erp"
        assert stored["path"] == "/q4/ledger.csv" and stored["size"] == src.stat().st_size
        assert stored["gateway"] == "gw-test" and stored["source"].startswith("127.0.0.1:")
        assert stored["received_at"] == t["received_at"]
        _, want = file_digests(src, ["sha256", "sha3-256", "blake2b"])
        assert stored["digests"] == want

        # The sidecar verifies offline (signature, HMAC, digests) against the delivered file.
        data = tmp_path / "A/acme/q4/ledger.csv"
        side = tmp_path / "A/acme/q4/ledger.csv.relayd.json"
        manifest = verify_document(side.read_bytes(), load_public_keys(signing), hmac_key=b"partner-shared-secret")
        assert manifest == stored
        assert verify_file(data, manifest) == sha256_file(src)
        # A destination without `sidecar` gets the data only; no temp files anywhere.
        assert sorted(p.name for p in (tmp_path / "B/q4").iterdir()) == ["ledger.csv"]
        assert not list(tmp_path.rglob("*.part"))
        # The delivery records what the far end confirmed: method and value.
        for x in t["deliveries"]:
            assert x["verified"] == "sha256" and x["remote_digest"] == want["sha256"]
