"""Signing keys, canonical manifests, sidecars and offline verification (relayd.integrity), in process."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key as rsa_key

from relayd.integrity import KeyRing, Notary, SigningKeyError, key_id, load_public_key, load_public_keys
from relayd.integrity import keys as keys_mod
from relayd.integrity.admin import MAX_SIDECAR, export_keys, rotate_keys, show_keys, verify
from relayd.integrity.manifest import (SIDECAR_SUFFIX, Signed, VerifyError, build_manifest, canonical,
                                       file_digests, parse_sidecar, read_hmac_key, sidecar_bytes,
                                       verify_document, verify_file)

FIELDS = {"version", "transfer_id", "tenant", "user", "path", "size", "digests", "received_at", "source",
          "gateway", "key_id"}


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.open(tmp_path / "state")


def _sign_file(ring: KeyRing, path: Path, extra: tuple[str, ...] = (), transfer_id: str = "01JTEST") -> Signed:
    size, digests = file_digests(path, ("sha256", *extra))
    return Notary(ring, "gw-test", extra).sign(transfer_id=transfer_id, tenant="acme", user="acme-erp",
                                               path=f"/in/{path.name}", size=size, digests=digests,
                                               received_at="2026-12-03T17:00:00.123456Z",
                                               source="203.0.113.9:50122")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "a.csv"
    p.write_bytes(b"id;name\n1;Zo\xc3\xa9\n" * 1000)
    return p


def _doc(data: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(data)
    return value


def _redo(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# --- canonical JSON ---------------------------------------------------------------------------


def test_canonical_sorted_compact_and_stable() -> None:
    a = {"b": 1, "a": {"z": [1, 2], "y": "x"}, "c": None}
    b = {"c": None, "a": {"y": "x", "z": [1, 2]}, "b": 1}
    assert canonical(a) == canonical(b) == b'{"a":{"y":"x","z":[1,2]},"b":1,"c":null}'


def test_canonical_keeps_utf8_unescaped() -> None:
    out = canonical({"path": "/in/Zoé 東京.csv"})
    assert out == '{"path":"/in/Zoé 東京.csv"}'.encode()
    assert b"\\u" not in out


def test_canonical_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


def test_manifest_fields_and_sha256_required() -> None:
    m = build_manifest(transfer_id="t", tenant="acme", user="u", path="/p", size=1,
                       digests={"sha3-256": "b", "sha256": "a"}, received_at="r", source="s", gateway="g",
                       key_id="k")
    assert set(m) == FIELDS and m["version"] == 1
    assert list(m["digests"]) == ["sha256", "sha3-256"]
    with pytest.raises(ValueError):
        build_manifest(transfer_id="t", tenant="acme", user="u", path="/p", size=1, digests={"md5": "x"},
                       received_at="r", source="s", gateway="g", key_id="k")


# --- signing and verification -----------------------------------------------------------------


def test_sign_verify_round_trip(ring: KeyRing, data_file: Path) -> None:
    signed = _sign_file(ring, data_file)
    assert signed.body == canonical(signed.manifest) and signed.key_id == ring.current_id
    sidecar = sidecar_bytes(signed)
    assert sidecar.endswith(b"\n") and sidecar.count(b"\n") == 1
    doc = _doc(sidecar)
    assert doc["algorithm"] == "ed25519" and set(doc) == {"manifest", "signature", "algorithm"}
    manifest = verify_document(sidecar, ring.public_keys())
    assert set(manifest) == FIELDS and manifest["key_id"] == ring.current_id
    assert verify_file(data_file, manifest) == manifest["digests"]["sha256"]


def test_sidecar_whitespace_and_key_order_do_not_matter(ring: KeyRing, data_file: Path) -> None:
    """The signature covers the canonical form, not the sidecar's bytes."""
    doc = _doc(sidecar_bytes(_sign_file(ring, data_file)))
    pretty = json.dumps({"signature": doc["signature"], "manifest": dict(reversed(list(doc["manifest"].items()))),
                         "algorithm": "ed25519"}, indent=4, ensure_ascii=True).encode()
    assert verify_document(pretty, ring.public_keys())["size"] == data_file.stat().st_size


@pytest.mark.parametrize("field,value", [("size", 1), ("path", "/in/other.csv"), ("tenant", "globex"),
                                         ("digests", {"sha256": "0" * 64}), ("extra", True)])
def test_tampered_manifest_is_bad_signature(ring: KeyRing, data_file: Path, field: str, value: Any) -> None:
    doc = _doc(sidecar_bytes(_sign_file(ring, data_file)))
    doc["manifest"][field] = value
    with pytest.raises(VerifyError) as e:
        verify_document(_redo(doc), ring.public_keys())
    assert e.value.reason == "bad signature"


def test_tampered_signature_is_bad_signature(ring: KeyRing, data_file: Path) -> None:
    doc = _doc(sidecar_bytes(_sign_file(ring, data_file)))
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[10] ^= 1
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(VerifyError) as e:
        verify_document(_redo(doc), ring.public_keys())
    assert e.value.reason == "bad signature"
    doc["signature"] = base64.b64encode(bytes(sig[:20])).decode()
    with pytest.raises(VerifyError) as e:
        verify_document(_redo(doc), ring.public_keys())
    assert e.value.reason == "bad signature"


def test_unknown_key(ring: KeyRing, data_file: Path, tmp_path: Path) -> None:
    other = KeyRing.open(tmp_path / "other")
    sidecar = sidecar_bytes(_sign_file(ring, data_file))
    with pytest.raises(VerifyError) as e:
        verify_document(sidecar, other.public_keys())
    assert e.value.reason == "unknown key id" and ring.current_id in str(e.value)
    with pytest.raises(VerifyError) as e:
        verify_document(sidecar, {})
    assert e.value.reason == "unknown key id"


def test_claimed_key_id_of_another_known_key_is_bad_signature(ring: KeyRing, data_file: Path) -> None:
    """Relabelling a manifest with a kept key's id does not help a forger."""
    old = ring.current_id
    new = ring.rotate()
    doc = _doc(sidecar_bytes(_sign_file(new, data_file)))
    doc["manifest"]["key_id"] = old
    with pytest.raises(VerifyError) as e:
        verify_document(_redo(doc), new.public_keys())
    assert e.value.reason == "bad signature"


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"{}", b'"x"', b"17", b'{"manifest": {}}', b'{"signature": "AAAA"}',
    b'{"manifest": [], "signature": "AAAA"}', b'{"manifest": {}, "signature": "***"}',
    b'{"manifest": {}, "signature": 5}', b'{"manifest": {"size": NaN}, "signature": "AAAA"}',
    b"\xff\xfe{", b"[" * 100_000 + b"]" * 100_000,
])
def test_malformed_sidecars(data: bytes, ring: KeyRing) -> None:
    with pytest.raises(VerifyError) as e:
        verify_document(data, ring.public_keys())
    assert e.value.reason == "malformed manifest"


def test_signed_manifest_missing_a_field_is_malformed(ring: KeyRing) -> None:
    body = canonical({"key_id": ring.current_id, "transfer_id": "t", "size": 1})
    signed = Signed(body, ring.sign(body), ring.current_id)
    with pytest.raises(VerifyError) as e:
        verify_document(sidecar_bytes(signed), ring.public_keys())
    assert e.value.reason == "malformed manifest" and "digests" in str(e.value)


def test_parse_sidecar_returns_canonical_body(ring: KeyRing, data_file: Path) -> None:
    signed = _sign_file(ring, data_file)
    manifest, body, signature, _ = parse_sidecar(sidecar_bytes(signed))
    assert (body, signature, manifest) == (signed.body, signed.signature, signed.manifest)


# --- digests ----------------------------------------------------------------------------------


def test_extra_digests_are_all_verified(ring: KeyRing, data_file: Path) -> None:
    signed = _sign_file(ring, data_file, ("sha3-256", "blake2b"))
    manifest = verify_document(sidecar_bytes(signed), ring.public_keys())
    assert set(manifest["digests"]) == {"sha256", "sha3-256", "blake2b"}
    assert len(manifest["digests"]["blake2b"]) == 128
    assert verify_file(data_file, manifest)
    for name in ("sha3-256", "blake2b"):
        wrong = {**manifest, "digests": {**manifest["digests"], name: "00" * 32}}
        with pytest.raises(VerifyError) as e:
            verify_file(data_file, wrong)
        assert e.value.reason == "digest mismatch" and name in str(e.value)


def test_file_changes_are_digest_mismatch(ring: KeyRing, data_file: Path) -> None:
    manifest = _sign_file(ring, data_file).manifest
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    data_file.write_bytes(bytes(data))
    with pytest.raises(VerifyError) as e:
        verify_file(data_file, manifest)
    assert e.value.reason == "digest mismatch" and "sha256" in str(e.value)
    data_file.write_bytes(bytes(data) + b"x")
    with pytest.raises(VerifyError) as e:
        verify_file(data_file, manifest)
    assert e.value.reason == "digest mismatch" and "size" in str(e.value)


def test_empty_file(ring: KeyRing, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    manifest = verify_document(sidecar_bytes(_sign_file(ring, empty)), ring.public_keys())
    assert manifest["size"] == 0
    assert verify_file(empty, manifest) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --- HMAC -------------------------------------------------------------------------------------


def test_hmac(ring: KeyRing, data_file: Path, tmp_path: Path) -> None:
    signed = _sign_file(ring, data_file)
    key_file = tmp_path / "sidecar.hmac"
    key_file.write_bytes(b"  s3cret-shared-key\n")
    key = read_hmac_key(key_file)
    assert key == b"s3cret-shared-key"
    with_mac = sidecar_bytes(signed, key)
    assert len(_doc(with_mac)["hmac_sha256"]) == 64
    assert verify_document(with_mac, ring.public_keys(), key)
    assert verify_document(with_mac, ring.public_keys())  # the HMAC is optional to check
    for data, k in ((with_mac, b"other"), (sidecar_bytes(signed), key)):
        with pytest.raises(VerifyError) as e:
            verify_document(data, ring.public_keys(), k)
        assert e.value.reason == "bad signature" and "HMAC" in str(e.value)
    key_file.write_bytes(b"\n")
    with pytest.raises(ValueError):
        read_hmac_key(key_file)


# --- the key ring -----------------------------------------------------------------------------


def test_first_open_creates_key_with_modes(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the strictest umask must not make .pub unreadable, nor a loose one leak .key
    try:
        ring = KeyRing.open(tmp_path / "state")
    finally:
        os.umask(old)
    d = tmp_path / "state" / "signing"
    assert ring.directory == d and len(ring.current_id) == 16
    assert (d / "current").read_text() == f"{ring.current_id}\n"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / f"{ring.current_id}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / f"{ring.current_id}.pub").stat().st_mode) == 0o644
    assert stat.S_IMODE((d / "current").stat().st_mode) == 0o644
    assert sorted(os.listdir(d)) == sorted(["current", f"{ring.current_id}.key", f"{ring.current_id}.pub"])
    again = KeyRing.open(tmp_path / "state", create=False)
    assert again.current_id == ring.current_id and key_id(again.public) == ring.current_id


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="no signing key"):
        KeyRing.open(tmp_path / "state", create=False)
    assert not (tmp_path / "state").exists()


def test_stale_temp_file_does_not_leak_private_key(tmp_path: Path, umask: None) -> None:
    d = tmp_path / "signing"
    d.mkdir(mode=0o700)
    stale = d / ".k.key.tmp"
    stale.write_bytes(b"junk" * 100)
    os.chmod(stale, 0o666)
    keys_mod._write_atomic(d / "k.key", b"secret", 0o600)
    assert stat.S_IMODE((d / "k.key").stat().st_mode) == 0o600
    assert (d / "k.key").read_bytes() == b"secret" and not stale.exists()


def test_rotation_keeps_old_public_keys(ring: KeyRing, data_file: Path) -> None:
    old_sidecar = sidecar_bytes(_sign_file(ring, data_file, transfer_id="old"))
    old_id = ring.current_id
    new = ring.rotate()
    assert new.current_id != old_id
    d = ring.directory
    assert not (d / f"{old_id}.key").exists(), "the old private key must be gone"
    assert (d / f"{old_id}.pub").exists()
    reopened = KeyRing.open(d.parent, create=False)
    assert reopened.current_id == new.current_id
    assert set(reopened.public_keys()) == {old_id, new.current_id} == set(load_public_keys(d))
    assert verify_document(old_sidecar, reopened.public_keys())["transfer_id"] == "old"
    new_sidecar = sidecar_bytes(_sign_file(reopened, data_file, transfer_id="new"))
    assert _doc(new_sidecar)["manifest"]["key_id"] == new.current_id
    third = reopened.rotate()
    keys = third.public_keys()
    assert len(keys) == 3
    for sc in (old_sidecar, new_sidecar):
        verify_document(sc, keys)


def test_crash_before_current_is_renamed_keeps_the_old_key(ring: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation interrupted before ``current`` is replaced leaves the old key in charge."""
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        if Path(dst).name == "current":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(keys_mod.os, "replace", crash)
    with pytest.raises(OSError):
        ring.rotate()
    monkeypatch.undo()
    again = KeyRing.open(ring.directory.parent, create=False)
    assert again.current_id == ring.current_id
    assert (ring.directory / f"{ring.current_id}.key").exists()
    assert (ring.directory / "current").read_text().strip() == ring.current_id
    # the orphan key of the interrupted rotation is harmless; the next rotation works
    assert again.rotate().current_id != ring.current_id


def test_broken_current(ring: KeyRing) -> None:
    current = ring.directory / "current"
    current.write_text("not-an-id\n")
    with pytest.raises(SigningKeyError, match="does not hold a key id"):
        KeyRing.open(ring.directory.parent)
    current.write_text("0123456789abcdef\n")
    with pytest.raises(SigningKeyError, match="cannot read signing key"):
        KeyRing.open(ring.directory.parent)
    other = Ed25519PrivateKey.generate()
    (ring.directory / "0123456789abcdef.key").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SigningKeyError, match="does not hold the Ed25519 key"):
        KeyRing.open(ring.directory.parent)


# --- loading public keys ----------------------------------------------------------------------


def test_load_public_key_forms(ring: KeyRing, tmp_path: Path) -> None:
    kid = ring.current_id
    pub = ring.public
    forms = {
        "openssh.pub": (ring.directory / f"{kid}.pub").read_bytes(),
        "pem.pem": pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "pkcs8.key": (ring.directory / f"{kid}.key").read_bytes(),
        "openssh.key": ring.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()),
        "commented.pub": b"# gateway gw-fra-1\n\n" + (ring.directory / f"{kid}.pub").read_bytes(),
        "bare.pub": pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    }
    for name, data in forms.items():
        (tmp_path / name).write_bytes(data)
        assert key_id(load_public_key(tmp_path / name)) == kid, name


def test_load_public_key_from_ssh_keygen(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "x", "-f", str(tmp_path / "k")], check=True)
    assert key_id(load_public_key(tmp_path / "k")) == key_id(load_public_key(tmp_path / "k.pub"))


@pytest.mark.parametrize("data,match", [
    (b"", "not a readable public key"), (b"garbage\x00\xff", "not a readable public key"),
    (b"ssh-foo AAAAB3NzaC1yc2EAAAADAQABAAABAQ", "not a readable public key"),
    (b"ssh-ed25519 AAAAnope", "not a readable public key"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "not a readable public key"),
    (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
     "not a readable public key"),
])
def test_load_public_key_rejects(tmp_path: Path, data: bytes, match: str) -> None:
    (tmp_path / "k").write_bytes(data)
    with pytest.raises(SigningKeyError, match=match):
        load_public_key(tmp_path / "k")


def test_load_public_key_rejects_other_algorithms_and_missing_files(tmp_path: Path) -> None:
    rsa = rsa_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(rsa.public_bytes(serialization.Encoding.OpenSSH,
                                                        serialization.PublicFormat.OpenSSH))
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_public_key(tmp_path / "rsa.pub")
    with pytest.raises(SigningKeyError, match="cannot read key file"):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(SigningKeyError, match="cannot read key directory"):
        load_public_keys(tmp_path / "missing")


def test_load_public_keys_ids_come_from_keys_not_names(ring: KeyRing, tmp_path: Path) -> None:
    d = tmp_path / "partner"
    d.mkdir()
    (d / "0000000000000000.pub").write_bytes((ring.directory / f"{ring.current_id}.pub").read_bytes())
    (d / "README").write_text("not a key")
    assert list(load_public_keys(d)) == [ring.current_id]


# --- relayd keys / relayd verify (what the CLI calls) ------------------------------------------


def test_show_rotate_export(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(SigningKeyError, match="--create"):
        show_keys(state)
    first = show_keys(state, create=True)
    assert first.created and first.kept == ()
    assert first.openssh.startswith("ssh-ed25519 ") and first.openssh.endswith(f"relayd-manifest-{first.current_id}")
    assert first.pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert not show_keys(state).created
    old, second = rotate_keys(state)
    assert old == first.current_id and second.kept == (old,)
    _, third = rotate_keys(state)
    assert third.kept == (old, second.current_id)
    info = show_keys(state)
    assert info.current_id == third.current_id and info.to_dict()["kept"] == [old, second.current_id]
    assert f"current signing key: {info.current_id}" in info.text() and old in info.text()
    written = export_keys(state, tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(f"{k}.pub" for k in (old, second.current_id, info.current_id))
    assert set(load_public_keys(tmp_path / "out")) == {old, second.current_id, info.current_id}
    pems = [p for p in export_keys(state, tmp_path / "pem", pem=True) if p.suffix == ".pem"]
    assert len(pems) == 3 and all(key_id(load_public_key(p)) == p.stem for p in pems)
    with pytest.raises(SigningKeyError):
        rotate_keys(tmp_path / "nothing")
    with pytest.raises(SigningKeyError):
        export_keys(tmp_path / "nothing", tmp_path / "out2")


def test_verify_lines(ring: KeyRing, data_file: Path, tmp_path: Path) -> None:
    signed = _sign_file(ring, data_file, ("blake2b",))
    sidecar = Path(str(data_file) + SIDECAR_SUFFIX)
    sidecar.write_bytes(sidecar_bytes(signed))
    pub = ring.directory / f"{ring.current_id}.pub"
    sha = signed.manifest["digests"]["sha256"]
    assert verify(data_file, pubkeys=[pub]) == (True, f"OK 01JTEST {sha}")
    assert verify(data_file, keys_dir=ring.directory) == (True, f"OK 01JTEST {sha}")
    other = KeyRing.open(tmp_path / "other")
    ok, line = verify(data_file, pubkeys=[other.directory / f"{other.current_id}.pub", pub])
    assert ok, line

    def fails(**kw: Any) -> str:
        ok, line = verify(**{"file": data_file, "pubkeys": [pub], **kw})
        assert not ok and "\n" not in line and line.startswith("FAIL "), line
        return line

    assert fails(pubkeys=[other.directory / f"{other.current_id}.pub"]).startswith("FAIL unknown key id: ")
    assert fails(file=tmp_path / "nope", manifest=sidecar).startswith("FAIL unreadable: file ")
    assert fails(manifest=tmp_path / "nope.json").startswith("FAIL unreadable: manifest ")
    assert fails(pubkeys=[tmp_path / "nope.pub"]).startswith("FAIL unreadable: ")
    assert fails(hmac_key_file=tmp_path / "nope").startswith("FAIL unreadable: HMAC key file")
    (tmp_path / "big.json").write_bytes(b" " * (MAX_SIDECAR + 1))
    assert fails(manifest=tmp_path / "big.json").startswith("FAIL malformed manifest: ")
    (tmp_path / "bad.json").write_bytes(b"{\n\n")
    assert fails(manifest=tmp_path / "bad.json").startswith("FAIL malformed manifest: ")
    doc = _doc(sidecar.read_bytes())
    doc["manifest"]["size"] += 1
    (tmp_path / "edited.json").write_bytes(_redo(doc))
    assert fails(manifest=tmp_path / "edited.json").startswith("FAIL bad signature: ")
    data_file.write_bytes(data_file.read_bytes()[:-1] + b"!")
    assert fails().startswith("FAIL digest mismatch: sha256 is ")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_files_written_by_root_belong_to_the_daemon_user(tmp_path: Path) -> None:
    """``relayd keys`` run by root: the daemon (owner of state_dir) can still read its key."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4321, 4321)
    ring = KeyRing.open(state)
    new = ring.rotate()
    d = state / "signing"
    for p in (d, d / "current", d / f"{new.current_id}.key", d / f"{new.current_id}.pub",
              d / f"{ring.current_id}.pub"):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (4321, 4321), p
    assert stat.S_IMODE((d / f"{new.current_id}.key").stat().st_mode) == 0o600
