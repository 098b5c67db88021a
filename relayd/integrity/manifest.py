"""Manifests: what the gateway signs for every committed file, and how anyone checks it offline.

A manifest is a flat JSON object in canonical form (keys sorted, UTF-8, no insignificant
whitespace: :func:`canonical`)::

    {"digests":{"sha256":"…"},"gateway":"gw-fra-1","key_id":"1f0c…","path":"/in/a.csv",
     "received_at":"2026-12-03T17:00:00.123456Z","size":1234,"source":"203.0.113.9:50122",
     "tenant":"acme","transfer_id":"01J…","user":"acme-erp","version":1}

The Ed25519 signature covers exactly those bytes. ``digests`` always holds ``sha256`` and, when
configured, ``sha3-256`` or ``blake2b`` (BLAKE2b-512). A sidecar (``<name>.relayd.json``) holds
``{"manifest": {...}, "signature": "<base64>", "algorithm": "ed25519"}`` and optionally
``"hmac_sha256": "<hex>"`` (HMAC-SHA256 with a shared key over the same canonical bytes).

Verification (:func:`verify_document`, :func:`verify_file`) needs no config and no daemon:
signature first (so a doctored manifest reads ``bad signature`` whatever else it says), then
size and every digest against the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relayd.integrity.keys import KeyRing, verify_signature

__all__ = ["MANIFEST_VERSION", "EXTRA_DIGESTS", "SIDECAR_SUFFIX", "Signed", "VerifyError", "canonical",
           "build_manifest", "sign_manifest", "sidecar_bytes", "parse_sidecar", "verify_document",
           "verify_file", "file_digests", "parse_json_document", "new_hashers", "hmac_hex", "read_hmac_key"]

MANIFEST_VERSION = 1
SIDECAR_SUFFIX = ".relayd.json"
EXTRA_DIGESTS: Mapping[str, Callable[[], Any]] = {
    "sha3-256": hashlib.sha3_256,
    "blake2b": hashlib.blake2b,
}
"""Digests that can be added to ``sha256`` (``integrity.digests``)."""
_ALL_DIGESTS: Mapping[str, Callable[[], Any]] = {"sha256": hashlib.sha256, **EXTRA_DIGESTS}
_CHUNK = 1024 * 1024


class VerifyError(Exception):
    """A manifest or file does not verify. ``reason`` is one of ``bad signature``, ``unknown key
    id``, ``digest mismatch``, ``malformed manifest``; the message adds the detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, ``,``/``:`` separators, UTF-8 (not ASCII-escaped)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def build_manifest(*, transfer_id: str, tenant: str, user: str, path: str, size: int,
                   digests: Mapping[str, str], received_at: str, source: str, gateway: str,
                   key_id: str) -> dict[str, Any]:
    """The manifest object for one committed file (``digests`` must include ``sha256``)."""
    if "sha256" not in digests:
        raise ValueError("a manifest needs the sha256 digest")
    return {"version": MANIFEST_VERSION, "transfer_id": transfer_id, "tenant": tenant, "user": user,
            "path": path, "size": size, "digests": dict(sorted(digests.items())),
            "received_at": received_at, "source": source, "gateway": gateway, "key_id": key_id}


@dataclass(frozen=True)
class Signed:
    """A canonical manifest and the signature over it."""

    body: bytes
    """The canonical JSON bytes that were signed."""
    signature: bytes
    key_id: str

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as an object."""
        value: dict[str, Any] = json.loads(self.body)
        return value


def sign_manifest(ring: KeyRing, manifest: Mapping[str, Any]) -> Signed:
    """Sign ``manifest`` (whose ``key_id`` must be the ring's current key)."""
    if manifest.get("key_id") != ring.current_id:
        raise ValueError("manifest key_id is not the current signing key")
    body = canonical(manifest)
    return Signed(body, ring.sign(body), ring.current_id)


def read_hmac_key(path: Path) -> bytes:
    """The shared HMAC key in the file at ``path``: its bytes, surrounding whitespace stripped
    (so a trailing newline does not matter). Raises OSError, or ValueError for an empty key."""
    key = Path(path).read_bytes().strip()
    if not key:
        raise ValueError(f"{path} holds no HMAC key (the file is empty)")
    return key


def hmac_hex(key: bytes, body: bytes) -> str:
    """HMAC-SHA256 of ``body`` with ``key``, hex."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def sidecar_bytes(signed: Signed, hmac_key: bytes | None = None) -> bytes:
    """The sidecar document for ``signed`` (canonical JSON plus a newline)."""
    doc: dict[str, Any] = {"manifest": signed.manifest, "signature": base64.b64encode(signed.signature).decode(),
                           "algorithm": "ed25519"}
    if hmac_key is not None:
        doc["hmac_sha256"] = hmac_hex(hmac_key, signed.body)
    return canonical(doc) + b"\n"


def parse_sidecar(data: bytes) -> tuple[dict[str, Any], bytes, bytes, dict[str, Any]]:
    """``(manifest, canonical body, signature, whole document)`` from sidecar bytes."""
    manifest, body, signature = parse_json_document(data, "manifest")
    return manifest, body, signature, json.loads(data)


def parse_json_document(data: bytes, field: str) -> tuple[dict[str, Any], bytes, bytes]:
    """``(object, its canonical bytes, signature)`` of a signed document ``{field: {...}, "signature"}``."""
    try:
        doc = json.loads(data)
        obj = doc[field]
        signature = base64.b64decode(doc["signature"], validate=True)
        if not isinstance(obj, dict):
            raise TypeError(f"{field} is not an object")
        body = canonical(obj)
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as e:
        raise VerifyError("malformed manifest", f"{type(e).__name__}: {e}") from None
    return obj, body, signature


def verify_document(data: bytes, public_keys: Mapping[str, Ed25519PublicKey],
                    hmac_key: bytes | None = None) -> dict[str, Any]:
    """Check a sidecar's signature (and HMAC when a key is given); return its manifest."""
    manifest, body, signature, doc = parse_sidecar(data)
    kid = manifest.get("key_id")
    public = public_keys.get(kid) if isinstance(kid, str) else None
    if public is None:
        known = ", ".join(sorted(public_keys)) or "none"
        raise VerifyError("unknown key id", f"manifest signed by {kid!r}; known keys: {known}")
    if not verify_signature(public, signature, body):
        raise VerifyError("bad signature", f"the manifest does not match its Ed25519 signature (key {kid})")
    if hmac_key is not None:
        mac = doc.get("hmac_sha256")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, hmac_hex(hmac_key, body)):
            raise VerifyError("bad signature", "HMAC-SHA256 does not match the shared key")
    for field in ("transfer_id", "size", "digests"):
        if field not in manifest:
            raise VerifyError("malformed manifest", f"no {field}")
    return manifest


def new_hashers(names: Iterable[str]) -> dict[str, Any]:
    """Fresh hash objects by digest name (``sha256``, ``sha3-256``, ``blake2b``)."""
    return {name: _ALL_DIGESTS[name]() for name in names}


def file_digests(path: Path, names: Iterable[str]) -> tuple[int, dict[str, str]]:
    """``(size, {name: hex})`` of the file at ``path``, streamed in 1 MiB chunks."""
    hashers = new_hashers(names)
    size = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            size += len(chunk)
            for h in hashers.values():
                h.update(chunk)
    finally:
        os.close(fd)
    return size, {name: h.hexdigest() for name, h in hashers.items()}


def verify_file(path: Path, manifest: Mapping[str, Any]) -> str:
    """Check ``path`` against a (signature-checked) manifest; return its sha256 or raise."""
    digests = manifest.get("digests")
    if not isinstance(digests, dict) or not isinstance(digests.get("sha256"), str):
        raise VerifyError("malformed manifest", "no sha256 digest")
    names = ["sha256", *(n for n in digests if n in EXTRA_DIGESTS)]  # sha256 first: it is what we report
    size, actual = file_digests(path, names)
    if size != manifest.get("size"):
        raise VerifyError("digest mismatch", f"size is {size} bytes, the manifest says {manifest.get('size')}")
    for name in names:
        if actual[name] != digests[name]:
            raise VerifyError("digest mismatch", f"{name} is {actual[name]}, the manifest says {digests[name]}")
    return str(digests["sha256"])
