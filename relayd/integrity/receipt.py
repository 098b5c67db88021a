"""Receipts: what a receiving relayd signs when it has committed a file a peer sent.

A receipt document is canonical JSON ``{"receipt": {...}, "signature": "<base64>", "algorithm":
"ed25519"}``; the Ed25519 signature (the receiving gateway's manifest key) covers exactly the
canonical bytes of the ``receipt`` object::

    {"gateway": "gw-ams-1", "key_id": "…", "kind": "relayd-receipt", "manifest_sha256": "…",
     "path": "/acme/ledger.csv", "received_at": "…", "sender_gateway": "gw-fra-1",
     "sender_transfer_id": "01J…", "sha256": "…", "size": 123, "tenant": "archive",
     "transfer_id": "01K…", "version": 1}

``manifest_sha256`` is the SHA-256 of the sender's canonical manifest bytes, binding the receipt
to exactly the offer that was accepted. The sender stores the document with its delivery;
``relayd verify --receipt`` checks it with the receiver's public key.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relayd.integrity.keys import KeyRing, verify_signature
from relayd.integrity.manifest import VerifyError, canonical, parse_json_document

__all__ = ["RECEIPT_KIND", "build_receipt", "verify_receipt"]

RECEIPT_KIND = "relayd-receipt"
RECEIPT_VERSION = 1


def build_receipt(ring: KeyRing, *, gateway: str, tenant: str, transfer_id: str, path: str, size: int,
                  sha256: str, received_at: str, sender_manifest: bytes,
                  sender: Mapping[str, Any]) -> bytes:
    """The signed receipt document for a committed transfer (``sender``: the offered manifest)."""
    receipt = {"version": RECEIPT_VERSION, "kind": RECEIPT_KIND, "gateway": gateway, "key_id": ring.current_id,
               "tenant": tenant, "transfer_id": transfer_id, "path": path, "size": size, "sha256": sha256,
               "received_at": received_at, "sender_gateway": str(sender.get("gateway", "")),
               "sender_transfer_id": str(sender.get("transfer_id", "")),
               "manifest_sha256": hashlib.sha256(sender_manifest).hexdigest()}
    body = canonical(receipt)
    doc = {"receipt": receipt, "signature": base64.b64encode(ring.sign(body)).decode(), "algorithm": "ed25519"}
    return canonical(doc) + b"\n"


def verify_receipt(data: bytes, public_keys: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Check a receipt document's signature; return the receipt object (VerifyError otherwise)."""
    receipt, body, signature = parse_json_document(data, "receipt")
    if receipt.get("kind") != RECEIPT_KIND:
        raise VerifyError("malformed manifest", "not a relayd receipt")
    kid = receipt.get("key_id")
    public = public_keys.get(kid) if isinstance(kid, str) else None
    if public is None:
        known = ", ".join(sorted(public_keys)) or "none"
        raise VerifyError("unknown key id", f"receipt signed by {kid!r}; known keys: {known}")
    if not verify_signature(public, signature, body):
        raise VerifyError("bad signature", f"the receipt does not match its Ed25519 signature (key {kid})")
    for field in ("transfer_id", "size", "sha256", "gateway"):
        if field not in receipt:
            raise VerifyError("malformed manifest", f"receipt has no {field}")
    return receipt
