"""What ``relayd keys`` and ``relayd verify`` do, apart from argument parsing.

Everything here works without a running daemon; :func:`verify` needs no config either (it is
what a partner runs on a delivered file). ``relayd manifest`` reads the journal, so it lives in
:mod:`relayd.cli` (the integrity layer does not know the journal).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relayd.integrity.keys import (SIGNING_DIR, KeyRing, SigningKeyError, _write_atomic, key_id, load_public_key,
                                   load_public_keys, public_openssh, public_pem)
from relayd.integrity.manifest import SIDECAR_SUFFIX, VerifyError, read_hmac_key, verify_document, verify_file

__all__ = ["KeyInfo", "show_keys", "rotate_keys", "export_keys", "verify", "MAX_SIDECAR"]

MAX_SIDECAR = 1024 * 1024
"""A sidecar is a few hundred bytes; anything above this is not one (and is not read whole)."""


@dataclass(frozen=True)
class KeyInfo:
    """The signing keys of one gateway, as ``relayd keys show`` prints them."""

    directory: Path
    current_id: str
    openssh: str
    pem: str
    kept: tuple[str, ...]
    """Ids of the older public keys (oldest first), still accepted by verifiers."""
    created: bool = False
    """True when this call created the first key (``--create``)."""

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {"directory": str(self.directory), "current": self.current_id, "openssh": self.openssh,
                "pem": self.pem, "kept": list(self.kept), "created": self.created}

    def text(self) -> str:
        """The human form (several lines, no trailing newline)."""
        lines = [f"current signing key: {self.current_id}" + (" (created now)" if self.created else ""),
                 f"directory: {self.directory}", "", self.openssh, "", self.pem.rstrip("\n"), ""]
        lines.append("kept public keys (older, still verify): " + (" ".join(self.kept) if self.kept else "none"))
        return "\n".join(lines)


def _kept_ids(ring: KeyRing) -> tuple[str, ...]:
    """Ids of the ring's older public keys, oldest (by file time) first."""
    keys = ring.public_keys()

    def age(kid: str) -> tuple[float, str]:
        try:
            return (os.stat(ring.directory / f"{kid}.pub").st_mtime, kid)
        except OSError:
            return (0.0, kid)

    return tuple(sorted((k for k in keys if k != ring.current_id), key=age))


def _info(ring: KeyRing, created: bool = False) -> KeyInfo:
    return KeyInfo(ring.directory, ring.current_id, public_openssh(ring.public, f"relayd-manifest-{ring.current_id}"),
                   public_pem(ring.public), _kept_ids(ring), created)


def show_keys(state_dir: Path, create: bool = False) -> KeyInfo:
    """The current key and the kept ones; with ``create``, make the first key if there is none.

    Raises :class:`SigningKeyError` (no key yet and not ``create``, unreadable files).
    """
    directory = Path(state_dir) / SIGNING_DIR
    exists = (directory / "current").exists()
    if not exists and not create:
        raise SigningKeyError(f"no signing key in {directory} yet: relayd creates it when it first starts "
                              "(or create it now with --create)")
    ring = KeyRing.open(state_dir, create=create)
    return _info(ring, created=not exists)


def rotate_keys(state_dir: Path) -> tuple[str, KeyInfo]:
    """Make a new current key (the old public key is kept); ``(old id, new key info)``.

    There must be a key already: a missing one usually means the wrong config or ``state_dir``.
    """
    ring = KeyRing.open(state_dir, create=False)
    new = ring.rotate()
    return ring.current_id, _info(new)


def export_keys(state_dir: Path, out_dir: Path, pem: bool = False) -> list[Path]:
    """Write every public key of the gateway as ``<key id>.pub`` (OpenSSH form) into ``out_dir``,
    and with ``pem`` also as ``<key id>.pem`` (for ``openssl pkeyutl``).

    Needs only the public keys (not the private one). Returns the files written, by key id.
    """
    directory = Path(state_dir) / SIGNING_DIR
    if not (directory / "current").exists():
        raise SigningKeyError(f"no signing key in {directory} (it is created when relayd first starts)")
    keys = load_public_keys(directory)
    if not keys:
        raise SigningKeyError(f"no public keys in {directory}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kid, public in sorted(keys.items()):
        path = out_dir / f"{kid}.pub"
        _write_atomic(path, (public_openssh(public, f"relayd-manifest-{kid}") + "\n").encode(), 0o644)
        written.append(path)
        if pem:
            path = out_dir / f"{kid}.pem"
            _write_atomic(path, public_pem(public).encode(), 0o644)
            written.append(path)
    return written


# --- offline verification ---------------------------------------------------------------------


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _fail(reason: str, detail: str) -> tuple[bool, str]:
    return False, f"FAIL {reason}: {_one_line(detail)}"


def _read_sidecar(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_SIDECAR + 1)
    if len(data) > MAX_SIDECAR:
        raise VerifyError("malformed manifest", f"{path} is larger than {MAX_SIDECAR} bytes: not a sidecar")
    return data


def _load_keys(pubkeys: Sequence[Path], keys_dir: Path | None) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    if keys_dir is not None:
        keys.update(load_public_keys(Path(keys_dir)))
    for path in pubkeys:
        public = load_public_key(Path(path))
        keys[key_id(public)] = public
    return keys



class _Failed(Exception):
    """Carries the one-line FAIL result of :func:`verify`/:func:`verify_receipt_file`."""

    def __init__(self, result: tuple[bool, str]) -> None:
        super().__init__(result[1])
        self.result = result


def _document_and_keys(path: Path, what: str, pubkeys: Sequence[Path],
                       keys_dir: Path | None) -> tuple[bytes, dict[str, Ed25519PublicKey]]:
    """A signed document's bytes and the public keys to check it with; :class:`_Failed` otherwise."""
    try:
        data = _read_sidecar(path)
    except VerifyError as e:
        raise _Failed(_fail(e.reason, e.detail)) from None
    except OSError as e:
        raise _Failed(_fail("unreadable", f"{what} {path}: {e.strerror or e}")) from None
    try:
        return data, _load_keys(pubkeys, keys_dir)
    except SigningKeyError as e:
        raise _Failed(_fail("unreadable", str(e))) from None


def verify(file: Path, manifest: Path | None = None, pubkeys: Sequence[Path] = (), keys_dir: Path | None = None,
           hmac_key_file: Path | None = None) -> tuple[bool, str]:
    """Check ``file`` against its signed manifest; ``(ok, the one line to print)``.

    The line is ``OK <transfer id> <sha256>`` or ``FAIL <reason>: <detail>`` with reason one of
    ``digest mismatch``, ``bad signature``, ``unknown key id``, ``malformed manifest``,
    ``unreadable``. Order: read the sidecar and keys, then the signature (and HMAC), then size and
    every digest. Never raises for bad input.
    """
    file = Path(file)
    manifest_path = Path(manifest) if manifest is not None else Path(str(file) + SIDECAR_SUFFIX)
    try:
        data, keys = _document_and_keys(manifest_path, "manifest", pubkeys, keys_dir)
    except _Failed as f:
        return f.result
    hmac_key = None
    if hmac_key_file is not None:
        try:
            hmac_key = read_hmac_key(Path(hmac_key_file))
        except OSError as e:
            return _fail("unreadable", f"HMAC key file {hmac_key_file}: {e.strerror or e}")
        except ValueError as e:
            return _fail("unreadable", str(e))
    try:
        doc = verify_document(data, keys, hmac_key)
        sha256 = verify_file(file, doc)
    except VerifyError as e:
        return _fail(e.reason, e.detail or e.reason)
    except OSError as e:
        return _fail("unreadable", f"file {file}: {e.strerror or e}")
    return True, f"OK {_one_line(str(doc['transfer_id']))} {sha256}"


def verify_receipt_file(receipt: Path, file: Path | None = None, pubkeys: Sequence[Path] = (),
                        keys_dir: Path | None = None) -> tuple[bool, str]:
    """Check a peer's receipt (and ``file`` against its size and SHA-256 when given).

    Same one-line contract as :func:`verify`: ``OK <receiver transfer id> <sha256>`` or ``FAIL ...``.
    """
    from relayd.integrity.manifest import file_digests
    from relayd.integrity.receipt import verify_receipt

    try:
        data, keys = _document_and_keys(Path(receipt), "receipt", pubkeys, keys_dir)
    except _Failed as f:
        return f.result
    try:
        doc = verify_receipt(data, keys)
    except VerifyError as e:
        return _fail(e.reason, e.detail or e.reason)
    if file is not None:
        try:
            size, digests = file_digests(Path(file), ["sha256"])
        except OSError as e:
            return _fail("unreadable", f"file {file}: {e.strerror or e}")
        if size != doc.get("size") or digests["sha256"] != doc.get("sha256"):
            return _fail("digest mismatch", f"{file} has size {size} and sha256 {digests['sha256']}, the receipt "
                         f"says {doc.get('size')} and {doc.get('sha256')}")
    return True, f"OK {_one_line(str(doc['transfer_id']))} {_one_line(str(doc['sha256']))}"
