"""``relayd keys``, ``relayd manifest`` and ``relayd verify`` as real subprocesses against a real daemon.

The partner's view: a file, its sidecar (from ``relayd manifest`` or delivered next to the file)
and the gateway's public keys (``relayd keys export``); ``relayd verify`` prints one line.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import two_tenants
from tests.helpers import (Daemon, Key, base_config, free_port, make_file, relayd, run_daemon, sha256_file,
                           wait_for)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = relayd(*args)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def _verify(*args: str) -> tuple[int, str]:
    """``relayd verify``: exit code and its single stdout line."""
    proc = _run("verify", *args)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, lines[0]


def _upload(d: Daemon, key: Key, src: Path, remote: str) -> dict[str, Any]:
    r = d.sftp(key, "acme-erp", f"put {src} {remote}\n")
    assert r.returncode == 0, r.stderr
    [row] = [t for t in d.transfers() if t["path"] == remote]
    return row


def _manifest(d: Daemon, transfer_id: str, out: Path) -> Path:
    proc = _run("manifest", "-c", str(d.config_path), transfer_id, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _current(d: Daemon) -> str:
    return (Path(d.config["node"]["state_dir"]) / "signing" / "current").read_text().strip()


def test_first_start_creates_key_and_manifests_verify(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    with run_daemon(tmp_path / "gw", base_config(tmp_path / "gw", port, two_tenants(keys))) as d:
        cfg = str(d.config_path)
        signing = Path(d.config["node"]["state_dir"]) / "signing"
        assert (signing / "current").exists(), "the daemon creates its signing key on first start"
        kid = _current(d)
        assert (signing / f"{kid}.key").stat().st_mode & 0o777 == 0o600
        assert signing.stat().st_mode & 0o777 == 0o700

        show = _run("keys", "show", "-c", cfg)
        assert show.returncode == 0, show.stderr
        assert f"current signing key: {kid}" in show.stdout
        assert "ssh-ed25519 AAAA" in show.stdout and "-----BEGIN PUBLIC KEY-----" in show.stdout
        assert "kept public keys (older, still verify): none" in show.stdout
        info = json.loads(_run("keys", "show", "-c", cfg, "--json").stdout)
        assert info["current"] == kid and info["kept"] == [] and info["pem"].startswith("-----BEGIN PUBLIC KEY-----")

        src = make_file(tmp_path / "report.csv", 300_000, seed=1)
        row = _upload(d, keys["acme"], src, "/report.csv")
        tid = row["id"]

        # the partner's folder: the delivered file, its proof, and the gateway's public keys
        partner = tmp_path / "partner"
        partner.mkdir()
        shutil.copy(d.inbox("acme") / "report.csv", partner / "report.csv")
        _manifest(d, tid, partner)  # a directory: named after the file
        sidecar = partner / "report.csv.relayd.json"
        stdout = _run("manifest", "-c", cfg, tid).stdout
        assert stdout.encode() == sidecar.read_bytes()
        manifest = json.loads(sidecar.read_bytes())["manifest"]
        assert manifest["transfer_id"] == tid and manifest["key_id"] == kid and manifest["path"] == "/report.csv"
        assert manifest["tenant"] == "acme" and manifest["user"] == "acme-erp" and manifest["gateway"] == "gw-test"
        assert manifest["size"] == 300_000 and manifest["digests"]["sha256"] == sha256_file(src)

        exported = _run("keys", "export", "-c", cfg, str(tmp_path / "gwkeys"))
        assert exported.returncode == 0, exported.stderr
        assert (tmp_path / "gwkeys" / f"{kid}.pub").exists()
        ok = (0, f"OK {tid} {sha256_file(src)}")
        assert _verify(str(partner / "report.csv"), "--keys", str(tmp_path / "gwkeys")) == ok
        assert _verify(str(partner / "report.csv"), "--pubkey", str(tmp_path / "gwkeys" / f"{kid}.pub")) == ok
        # a PEM copy of the key (from `keys show --json`) works as well
        (tmp_path / "gw.pem").write_text(info["pem"])
        assert _verify(str(partner / "report.csv"), "--manifest", str(sidecar), "--pubkey",
                       str(tmp_path / "gw.pem")) == ok

        # a key that is not the gateway's
        foreign = tmp_path / "foreign"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(foreign)], check=True)
        rc, line = _verify(str(partner / "report.csv"), "--pubkey", f"{foreign}.pub")
        assert rc == 1 and line.startswith(f"FAIL unknown key id: manifest signed by '{kid}'"), line

        # the manifest edited to match another file: bad signature, whatever it now says
        for field, value in (("size", 299_999), ("path", "/other.csv")):
            doc = json.loads(sidecar.read_bytes())
            doc["manifest"][field] = value
            edited = tmp_path / f"edited-{field}.json"
            edited.write_text(json.dumps(doc))
            rc, line = _verify(str(partner / "report.csv"), "--manifest", str(edited), "--keys",
                               str(tmp_path / "gwkeys"))
            assert rc == 1 and line.startswith("FAIL bad signature: "), line

        # one flipped byte in the file
        data = bytearray((partner / "report.csv").read_bytes())
        data[123_456] ^= 0x20
        (partner / "report.csv").write_bytes(bytes(data))
        rc, line = _verify(str(partner / "report.csv"), "--keys", str(tmp_path / "gwkeys"))
        assert rc == 1 and line.startswith("FAIL digest mismatch: sha256 is "), line

        # things that are not there
        rc, line = _verify(str(partner / "missing.csv"), "--manifest", str(sidecar), "--keys",
                           str(tmp_path / "gwkeys"))
        assert rc == 1 and line.startswith("FAIL unreadable: file "), line
        rc, line = _verify(str(src), "--keys", str(tmp_path / "gwkeys"))
        assert rc == 1 and line.startswith("FAIL unreadable: manifest "), line
        (tmp_path / "junk.json").write_text("{not json")
        rc, line = _verify(str(src), "--manifest", str(tmp_path / "junk.json"), "--keys", str(tmp_path / "gwkeys"))
        assert rc == 1 and line.startswith("FAIL malformed manifest: "), line

        nope = _run("manifest", "-c", cfg, "01NOSUCHTRANSFER")
        assert nope.returncode == 1 and "no transfer with id 01NOSUCHTRANSFER" in nope.stderr


def test_rotation_with_reload_old_and_new_manifests_verify(tmp_path: Path, keys: dict[str, Key]) -> None:
    port = free_port()
    with run_daemon(tmp_path / "gw", base_config(tmp_path / "gw", port, two_tenants(keys))) as d:
        cfg = str(d.config_path)
        old = _current(d)
        first = _upload(d, keys["acme"], make_file(tmp_path / "a.bin", 10_000, seed=2), "/a.bin")

        rot = _run("keys", "rotate", "-c", cfg)
        assert rot.returncode == 0, rot.stderr
        new = _current(d)
        assert new != old and f"new signing key: {new}" in rot.stdout
        assert "systemctl reload relayd" in rot.stdout
        signing = Path(d.config["node"]["state_dir"]) / "signing"
        assert not (signing / f"{old}.key").exists() and (signing / f"{old}.pub").exists()

        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in d.log(), what="reload")
        second = _upload(d, keys["acme"], make_file(tmp_path / "b.bin", 20_000, seed=3), "/b.bin")

        info = json.loads(_run("keys", "show", "-c", cfg, "--json").stdout)
        assert info["current"] == new and info["kept"] == [old]
        assert _run("keys", "export", "-c", cfg, str(tmp_path / "gwkeys")).returncode == 0
        assert sorted(p.name for p in (tmp_path / "gwkeys").iterdir()) == sorted([f"{old}.pub", f"{new}.pub"])

        for row, kid, name in ((first, old, "a.bin"), (second, new, "b.bin")):
            side = _manifest(d, row["id"], tmp_path / f"{name}.relayd.json")
            assert json.loads(side.read_bytes())["manifest"]["key_id"] == kid
            inbox_file = d.inbox("acme") / name
            assert _verify(str(inbox_file), "--manifest", str(side), "--keys", str(tmp_path / "gwkeys")) == \
                (0, f"OK {row['id']} {row['sha256']}")
            # only the other key: the partner needs the key that signed it
            other = new if kid == old else old
            rc, line = _verify(str(inbox_file), "--manifest", str(side), "--pubkey",
                               str(tmp_path / "gwkeys" / f"{other}.pub"))
            assert rc == 1 and line.startswith("FAIL unknown key id: "), line


def test_delivered_sidecar_verifies_with_hmac(tmp_path: Path, keys: dict[str, Key]) -> None:
    """A local destination with ``sidecar: true``: the partner verifies what arrived, as it arrived."""
    port = free_port()
    hmac_file = tmp_path / "sidecar.hmac"
    hmac_file.write_text("shared-with-partner\n")
    tenants = two_tenants(keys, routes=[{"match": "**", "to": ["partner"]}])
    cfg = base_config(tmp_path / "gw", port, tenants)
    cfg["destinations"] = {"partner": {"type": "local", "path": str(tmp_path / "out"), "sidecar": True,
                                       "hmac_key_file": str(hmac_file)}}
    cfg["integrity"] = {"digests": ["sha3-256", "blake2b"]}
    with run_daemon(tmp_path / "gw", cfg) as d:
        src = make_file(tmp_path / "x.csv", 50_000, seed=4)
        row = _upload(d, keys["acme"], src, "/x.csv")
        delivered = tmp_path / "out" / "x.csv"
        wait_for(lambda: Path(str(delivered) + ".relayd.json").exists(), what="sidecar delivered")
        assert _run("keys", "export", "-c", str(d.config_path), str(tmp_path / "gwkeys")).returncode == 0
        doc = json.loads(Path(str(delivered) + ".relayd.json").read_bytes())
        assert set(doc["manifest"]["digests"]) == {"sha256", "sha3-256", "blake2b"} and "hmac_sha256" in doc
        ok = (0, f"OK {row['id']} {sha256_file(src)}")
        assert _verify(str(delivered), "--keys", str(tmp_path / "gwkeys")) == ok
        assert _verify(str(delivered), "--keys", str(tmp_path / "gwkeys"), "--hmac-key-file", str(hmac_file)) == ok
        (tmp_path / "wrong.hmac").write_text("not-the-key\n")
        rc, line = _verify(str(delivered), "--keys", str(tmp_path / "gwkeys"), "--hmac-key-file",
                           str(tmp_path / "wrong.hmac"))
        assert rc == 1 and line.startswith("FAIL bad signature: HMAC"), line


def test_keys_without_daemon(tmp_path: Path, keys: dict[str, Key]) -> None:
    """Before the first start there is no key: ``keys show`` says so (exit 1) unless ``--create``."""
    import yaml

    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, free_port(), two_tenants(keys))))
    for args in (("keys", "show"), ("keys", "rotate"), ("keys", "export", str(tmp_path / "x"))):
        proc = _run(*args, "-c", str(cfg))
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout
        assert "no signing key in" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "--create" in _run("keys", "show", "-c", str(cfg)).stderr
    created = _run("keys", "show", "-c", str(cfg), "--create")
    assert created.returncode == 0 and "(created now)" in created.stdout
    kid = (tmp_path / "state" / "signing" / "current").read_text().strip()
    assert f"current signing key: {kid}" in created.stdout
    again = _run("keys", "show", "-c", str(cfg), "--create")
    assert "(created now)" not in again.stdout and kid in again.stdout
    # verify needs no config at all
    rc, line = _verify(str(tmp_path / "nothing"), "--keys", str(tmp_path / "state" / "signing"))
    assert rc == 1 and line.startswith("FAIL unreadable: manifest ")
