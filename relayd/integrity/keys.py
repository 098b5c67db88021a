"""The gateway's Ed25519 signing keys: created on first start, rotated on request, never lost.

Layout in ``<state_dir>/signing/`` (directory 0700)::

    current            the key id of the key that signs new manifests
    <key id>.key       its private key (PKCS#8 PEM, 0600); only the current key has one
    <key id>.pub       every public key ever used (OpenSSH one-line form), kept forever so that
                       manifests signed before a rotation still verify

The key id is a short fingerprint of the public key: the first 16 hex digits of SHA-256 over
its 32 raw bytes (:func:`key_id`). Every file is written to a temporary name, fsynced and
renamed, so a crash never leaves a half-written key or a ``current`` that names a missing key.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["KeyRing", "SigningKeyError", "key_id", "load_public_key", "load_public_keys", "public_openssh",
           "public_pem", "verify_signature"]

SIGNING_DIR = "signing"
_ID_RE = re.compile(r"^[0-9a-f]{16}$")


class SigningKeyError(Exception):
    """A signing key cannot be created, read or parsed; the text says which file and why."""


def key_id(public: Ed25519PublicKey) -> str:
    """The 16-hex-digit fingerprint of ``public`` (SHA-256 over its raw bytes)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_openssh(public: Ed25519PublicKey, comment: str = "") -> str:
    """``ssh-ed25519 AAAA... [comment]``."""
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


def public_pem(public: Ed25519PublicKey) -> str:
    """``-----BEGIN PUBLIC KEY-----`` (SubjectPublicKeyInfo) form."""
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def verify_signature(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``public``'s Ed25519 signature over exactly ``data``."""
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a file in OpenSSH (``ssh-ed25519 ...``) or PEM form.

    A private key file is accepted too (its public half is used). Raises :class:`SigningKeyError`.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read key file {path}: {e.strerror or e}") from None
    text = data.strip()
    key: object
    try:
        if b"PRIVATE KEY" in text:
            if b"OPENSSH PRIVATE KEY" in text:
                key = serialization.load_ssh_private_key(text, password=None).public_key()
            else:
                key = serialization.load_pem_private_key(text, password=None).public_key()
        elif b"-----BEGIN" in text:
            key = serialization.load_pem_public_key(text)
        else:  # OpenSSH one-line form; the first line that is not a comment
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(b"#")]
            key = serialization.load_ssh_public_key(lines[0] if lines else b"")
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise SigningKeyError(f"{path} is not a readable public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def load_public_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    """Every ``*.pub`` key in ``directory`` by key id (ids are computed, never taken from names)."""
    keys: dict[str, Ed25519PublicKey] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise SigningKeyError(f"cannot read key directory {directory}: {e.strerror or e}") from None
    for name in names:
        if name.endswith(".pub") or name.endswith(".pem"):
            public = load_public_key(directory / name)
            keys[key_id(public)] = public
    return keys


def _owner_for(directory: Path) -> tuple[int, int] | None:
    """When root writes here (``relayd keys`` run by an admin), the uid/gid files should get:
    the owner of ``directory`` (the daemon's user), so that the daemon can still read them."""
    if os.geteuid() != 0:
        return None
    st = os.stat(directory)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename.

    The mode is set explicitly (the umask does not apply; a stale temporary file with other
    permissions is reset before anything is written into it).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    owner = _owner_for(path.parent)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _make_dir(directory: Path) -> None:
    """Create the signing directory (0700, owned like ``state_dir`` when made by root)."""
    existed = directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not existed:
        os.chmod(directory, 0o700)
        owner = _owner_for(directory.parent)
        if owner is not None:
            os.chown(directory, *owner)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class KeyRing:
    """The signing keys of one gateway (see the module docstring)."""

    directory: Path
    current_id: str
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        """The current public key."""
        return self.private.public_key()

    @classmethod
    def open(cls, state_dir: Path, create: bool = True) -> "KeyRing":
        """Load the current key, creating the first one when there is none (and ``create``)."""
        directory = Path(state_dir) / SIGNING_DIR
        current = directory / "current"
        if not current.exists():
            if not create:
                raise SigningKeyError(f"no signing key in {directory} (it is created when relayd first starts)")
            _make_dir(directory)
            return cls._new_current(directory)
        try:
            kid = current.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SigningKeyError(f"cannot read {current}: {getattr(e, 'strerror', None) or e}") from None
        if not _ID_RE.match(kid):
            raise SigningKeyError(f"{current} does not hold a key id")
        key_file = directory / f"{kid}.key"
        try:
            private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except OSError as e:
            raise SigningKeyError(f"cannot read signing key {key_file}: {e.strerror or e}") from None
        except ValueError as e:
            raise SigningKeyError(f"{key_file} is not a readable private key ({e})") from None
        if not isinstance(private, Ed25519PrivateKey) or key_id(private.public_key()) != kid:
            raise SigningKeyError(f"{key_file} does not hold the Ed25519 key {kid}")
        return cls(directory, kid, private)

    @classmethod
    def _new_current(cls, directory: Path) -> "KeyRing":
        private = Ed25519PrivateKey.generate()
        kid = key_id(private.public_key())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_atomic(directory / f"{kid}.key", pem, 0o600)
        _write_atomic(directory / f"{kid}.pub",
                      (public_openssh(private.public_key(), f"relayd-manifest-{kid}") + "\n").encode(), 0o644)
        _fsync_dir(directory)
        _write_atomic(directory / "current", f"{kid}\n".encode(), 0o644)
        _fsync_dir(directory)
        return cls(directory, kid, private)

    def rotate(self) -> "KeyRing":
        """Make a new current key; the old private key is deleted, its public key kept."""
        new = self._new_current(self.directory)
        old = self.directory / f"{self.current_id}.key"
        if old.exists() and self.current_id != new.current_id:
            os.unlink(old)
            _fsync_dir(self.directory)
        return new

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public key this gateway has used, by key id (the current one included)."""
        keys = load_public_keys(self.directory)
        keys[self.current_id] = self.public
        return keys

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` with the current key."""
        return self.private.sign(data)
