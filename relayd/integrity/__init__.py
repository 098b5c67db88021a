"""Integrity: the gateway's signing keys, signed manifests, and their offline verification.

See :mod:`relayd.integrity.keys` (Ed25519 key ring in ``state_dir/signing``) and
:mod:`relayd.integrity.manifest` (canonical JSON, signatures, sidecars, ``relayd verify``).
:class:`Notary` is what the commit path uses: one call per committed file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from relayd.integrity.keys import KeyRing, SigningKeyError, key_id, load_public_key, load_public_keys
from relayd.integrity.manifest import (EXTRA_DIGESTS, SIDECAR_SUFFIX, Signed, VerifyError, build_manifest,
                                       sidecar_bytes, sign_manifest, verify_document, verify_file)

__all__ = ["KeyRing", "SigningKeyError", "Notary", "Signed", "VerifyError", "EXTRA_DIGESTS", "SIDECAR_SUFFIX",
           "key_id", "load_public_key", "load_public_keys", "build_manifest", "sidecar_bytes",
           "sign_manifest", "verify_document", "verify_file"]


@dataclass
class Notary:
    """Signs the manifest of each committed file with the gateway's current key.

    ``digests`` are the extra digests computed next to SHA-256 (``integrity.digests``).
    """

    ring: KeyRing
    gateway: str
    digests: tuple[str, ...] = ()

    def sign(self, *, transfer_id: str, tenant: str, user: str, path: str, size: int,
             digests: Mapping[str, str], received_at: str, source: str) -> Signed:
        """Build and sign one manifest (``digests``: at least ``sha256``)."""
        manifest = build_manifest(transfer_id=transfer_id, tenant=tenant, user=user, path=path, size=size,
                                  digests=digests, received_at=received_at, source=source,
                                  gateway=self.gateway, key_id=self.ring.current_id)
        return sign_manifest(self.ring, manifest)
