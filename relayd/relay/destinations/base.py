"""The destination interface, its registry and the one publish algorithm every kind shares.

A :class:`Destination` takes one committed file (:class:`Payload`) and publishes it atomically at
the far end, returning an :class:`Outcome`. The kinds (``local``, ``sftp``, ...) register a factory
with :func:`register`; :func:`create_destination` picks it from ``DestinationConfig.type`` and
nothing else switches on the kind.

Kinds implement a few primitive file operations (:class:`Store`); :func:`publish` holds the
delivery logic once, so every kind keeps the same contract (tests/contract):

* the target is ``<path template>/<payload.path>``; the data goes to
  ``.<name>.<delivery_id>.part`` in the target directory, is verified, then renamed;
* a temp file left by an earlier attempt is resumed from its size; a failed verification deletes
  it and raises a retryable :class:`DestinationError` (the next attempt starts from 0);
* no temp but the final file already holds the payload (size and SHA-256): nothing is sent
  (a re-delivery after a crash never makes a second copy);
* ``on_conflict``: ``overwrite`` (default) replaces the final name; ``fail`` raises a
  non-retryable error; ``rename`` keeps both, publishing ours as ``<stem>.<delivery_id><ext>``
  (``report.csv`` → ``report.<delivery_id>.csv``; the name is deterministic, so a re-delivery finds
  it again).
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, TypeVar, runtime_checkable

from relayd.config.model import DestinationConfig
from relayd.integrity.manifest import SIDECAR_SUFFIX, Signed

__all__ = ["Payload", "Outcome", "DestinationError", "Destination", "Store", "DigestUnavailable",
           "register", "create_destination", "registered_kinds", "Target", "publish", "conflict_name",
           "temp_name", "parse_verify", "parse_on_conflict"]

log = logging.getLogger("relayd.relay.destinations")

ON_CONFLICT = ("overwrite", "rename", "fail")
VERIFY = ("sha256", "size")
PLACEHOLDERS = ("tenant", "user", "date")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Payload:
    """One delivery of one committed file to one destination."""

    delivery_id: str
    """Unique per (transfer, destination); goes into temp names."""
    transfer_id: str
    tenant: str
    user: str
    path: str
    """``/dir/file.csv``: the file's path inside the tenant root."""
    source: Path
    """The committed spool object (read-only, immutable)."""
    size: int
    sha256: str
    """Hex digest of the whole file."""
    received_at: str
    """RFC 3339 UTC, e.g. ``2026-12-03T17:00:00.123456Z``."""
    sidecar: bytes | None = None
    """The signed manifest document to publish as ``<final name>.relayd.json`` after the data file
    (destinations with ``sidecar: true``); None: no sidecar."""
    manifest: Signed | None = None
    """The transfer's signed manifest (None for transfers committed without one)."""
    fresh: bool = False
    """True for the first attempt ever of this delivery: no earlier attempt can have left a temp
    file or published anything, so :func:`publish` skips its look-ups (two round trips per file
    on a remote kind). False (the safe default) when unknown."""


@dataclass(frozen=True)
class Outcome:
    """What a successful :meth:`Destination.deliver` did.

    ``bytes_sent == size - resumed_from`` always holds; a re-delivery that found the file already
    published reports ``bytes_sent=0, resumed_from=size`` and says so in ``note``.
    """

    remote_path: str
    """Final path at the destination."""
    verified: str
    """``"sha256"`` or ``"size"``: what the far end confirmed."""
    remote_digest: str | None
    bytes_sent: int
    """Payload bytes actually transferred in this attempt."""
    resumed_from: int
    """Offset the attempt started from (0 = from scratch)."""
    note: str = ""
    receipt: str | None = None
    """A receiving relayd's signed receipt document (relayd destinations)."""
    upload_s: float | None = field(default=None, compare=False)
    """Seconds spent writing the temp file (None: not measured; not part of equality)."""
    verify_s: float | None = field(default=None, compare=False)
    """Seconds spent confirming it at the far end (None: not measured; not part of equality)."""


class DestinationError(Exception):
    """A delivery failed. ``retryable`` says whether trying again later can help.

    Callers decide retries from the flag only, never from the message text.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class DigestUnavailable(Exception):
    """The far end cannot compute a SHA-256 (e.g. the SSH server refuses exec); the text says why."""


@runtime_checkable
class Destination(Protocol):
    """A delivery target. Deliveries are idempotent per ``delivery_id``."""

    name: str
    slots: int
    """Deliveries the scheduler may run at once on this destination."""

    async def deliver(self, payload: Payload) -> Outcome:
        """Publish ``payload`` atomically; raise :class:`DestinationError` on failure."""
        ...

    async def close(self) -> None:
        """Close pooled connections (the destination may be used again afterwards)."""
        ...


class Store(Protocol):
    """Primitive file operations of one kind, used by :func:`publish`. Paths are absolute strings."""

    async def size_of(self, path: str) -> int | None:
        """Size of the regular file at ``path``, or None if there is none."""
        ...

    async def makedirs(self, path: str) -> None:
        """Create directory ``path`` and its parents as needed."""
        ...

    async def upload(self, temp: str, source: Path, offset: int, size: int) -> int:
        """Write ``source[offset:size]`` into ``temp`` at ``offset`` (create it; truncate if offset is 0).

        Returns the number of bytes written. The data must be durable once :meth:`durable`
        returns (as far as the kind can tell); a kind may leave that flush running in the
        background so it overlaps the verification.
        """
        ...

    async def durable(self, temp: str) -> None:
        """Return once the data :meth:`upload` wrote into ``temp`` is durable (its flush's error
        if it failed); called before ``temp`` is renamed into place."""
        ...

    async def sha256(self, path: str) -> str:
        """Hex SHA-256 of the file at ``path``; :class:`DigestUnavailable` if it cannot be computed."""
        ...

    async def remove(self, path: str) -> None:
        """Delete the file at ``path``; a missing file is fine."""
        ...

    async def replace(self, temp: str, final: str) -> None:
        """Rename ``temp`` to ``final``, replacing ``final`` if it exists (atomically where possible)."""
        ...

    async def link_new(self, temp: str, final: str) -> bool:
        """Publish ``temp`` as ``final`` only if ``final`` does not exist.

        Returns False (``temp`` untouched) if ``final`` exists; True once ``temp`` is gone and
        ``final`` holds it.
        """
        ...

    async def sync_dir(self, path: str) -> None:
        """Make the directory entries in ``path`` durable (no-op where the kind cannot)."""
        ...

    async def write_small(self, path: str, data: bytes) -> None:
        """Create or truncate ``path`` and write ``data`` (a few KiB) into it, durably where possible."""
        ...


# --- registry ---------------------------------------------------------------------------------

_D = TypeVar("_D", bound=type)
_REGISTRY: dict[str, Callable[[DestinationConfig], Any]] = {}


def register(kind: str) -> Callable[[_D], _D]:
    """Class decorator: make ``cls(config: DestinationConfig)`` the factory for ``type: kind``."""

    def decorate(cls: _D) -> _D:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"destination kind {kind!r} is registered twice")
        _REGISTRY[kind] = cls
        return cls

    return decorate


def registered_kinds() -> tuple[str, ...]:
    """The destination kinds with a registered factory, sorted."""
    return tuple(sorted(_REGISTRY))


def create_destination(config: DestinationConfig) -> Destination:
    """Build the destination ``config`` describes.

    Raises ValueError (naming the key) for a kind without an implementation or an option the
    schema lets through but the kind cannot use (e.g. an unknown ``on_conflict``).
    """
    factory = _REGISTRY.get(config.type)
    if factory is None:
        raise ValueError(f"destinations.{config.name}.type: kind {config.type!r} is not implemented "
                         f"(available: {', '.join(registered_kinds())})")
    dest: Destination = factory(config)
    return dest


# --- option helpers shared by the kinds ----------------------------------------------------------

def parse_verify(name: str, options: Mapping[str, Any]) -> str:
    """``verify`` as ``"sha256"`` or ``"size"`` (the schema's boolean: true = sha256, false = size)."""
    value = options.get("verify", True)
    if value is True or value == "sha256":
        return "sha256"
    if value is False or value == "size":
        return "size"
    raise ValueError(f"destinations.{name}.verify: must be sha256 or size (true/false), got {value!r}")


def parse_on_conflict(name: str, options: Mapping[str, Any]) -> str:
    """``on_conflict`` checked against ``overwrite | rename | fail`` (default overwrite)."""
    value = options.get("on_conflict") or "overwrite"
    if value not in ON_CONFLICT:
        raise ValueError(f"destinations.{name}.on_conflict: must be one of {', '.join(ON_CONFLICT)}, "
                         f"got {value!r}")
    return str(value)


@dataclass(frozen=True)
class Target:
    """The ``path`` template of a destination: a directory with ``{tenant}`` ``{user}`` ``{date}``."""

    template: str

    @classmethod
    def parse(cls, name: str, template: str) -> "Target":
        """Check the placeholders; ValueError names the key for an unknown one."""
        for field in _PLACEHOLDER_RE.findall(template):
            if field not in PLACEHOLDERS:
                raise ValueError(f"destinations.{name}.path: unknown placeholder {{{field}}} "
                                 f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        return cls(template)

    def final_path(self, payload: Payload) -> str:
        """The directory with placeholders filled in, joined with ``payload.path``.

        ``{date}`` is the UTC day of ``received_at``. A payload path with empty, ``.`` or ``..``
        components is refused (non-retryable): it could point outside the target directory.
        """
        values = {"tenant": payload.tenant, "user": payload.user, "date": _utc_date(payload.received_at)}
        for key in ("tenant", "user"):
            if not values[key] or "/" in values[key] or values[key] in (".", ".."):
                raise DestinationError(f"unusable {key} name {values[key]!r} for a path", retryable=False)
        directory = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.template)
        parts = payload.path.strip("/").split("/")
        if not payload.path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in payload.path:
            raise DestinationError(f"unsafe payload path {payload.path!r}", retryable=False)
        return posixpath.join(directory, *parts)


@functools.lru_cache(maxsize=1024)
def _utc_date(received_at: str) -> str:
    try:
        when = datetime.fromisoformat(received_at.replace("Z", "+00:00"))
    except ValueError:
        raise DestinationError(f"received_at is not RFC 3339: {received_at!r}", retryable=False) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d")


def open_spool_object(source: Path, size: int) -> int:
    """Open a committed spool object for reading; it must exist and have ``size`` bytes.

    Returns the fd (the caller closes it); a missing or wrong-size object is a
    non-retryable :class:`DestinationError`.
    """
    try:
        fd = os.open(source, os.O_RDONLY)
    except FileNotFoundError:
        raise DestinationError(f"spool object {source.name} is missing", retryable=False) from None
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise DestinationError(f"spool object {source.name} has size {actual}, expected {size}", retryable=False)
    return fd


def temp_name(final: str, delivery_id: str) -> str:
    """``/d/.name.<delivery_id>.part`` for final path ``/d/name``."""
    directory, name = posixpath.split(final)
    return posixpath.join(directory, f".{name}.{delivery_id}.part")


def conflict_name(final: str, delivery_id: str) -> str:
    """The keep-both name for ``on_conflict: rename``: the delivery id before the last extension.

    ``/d/report.csv`` → ``/d/report.<id>.csv``; ``/d/a.tar.gz`` → ``/d/a.tar.<id>.gz``;
    ``/d/README`` and ``/d/.env`` → ``/d/README.<id>``, ``/d/.env.<id>``.
    """
    directory, name = posixpath.split(final)
    stem, ext = posixpath.splitext(name)
    return posixpath.join(directory, f"{stem}.{delivery_id}{ext}")


# --- the publish algorithm ---------------------------------------------------------------------

async def publish(store: Store, payload: Payload, final: str, *, verify: str, on_conflict: str,
                  logger: logging.Logger = log, context: str = "") -> Outcome:
    """Deliver ``payload`` to ``final`` through ``store``: resume or upload, verify, rename.

    Only :class:`DestinationError` is meant to escape for expected failures; kinds map their own
    transport errors around this call.
    """
    if not _SAFE_ID_RE.match(payload.delivery_id):
        raise DestinationError(f"delivery id {payload.delivery_id!r} is not usable in a file name", retryable=False)
    temp = temp_name(final, payload.delivery_id)
    alt = conflict_name(final, payload.delivery_id)
    have = None if payload.fresh else await store.size_of(temp)
    if payload.fresh:
        # Nothing of ours can be there yet: a final file with the same content is someone else's
        # (overwrite replaces it with identical bytes; fail/rename find it at the rename).
        await store.makedirs(posixpath.dirname(final))
        offset = 0
    elif have is None:
        done = await _already_published(store, payload, final, alt if on_conflict == "rename" else None)
        if done is not None:
            logger.info("%s already published at %s; nothing sent", context, done.remote_path)
            await _publish_sidecar(store, payload, done.remote_path)
            return done
        await store.makedirs(posixpath.dirname(final))
        offset = 0
    elif have > payload.size:
        logger.warning("%s temp file larger than the payload (%d > %d); starting over", context, have,
                       payload.size)
        await store.remove(temp)
        offset = 0
    else:
        offset = have
        if offset:
            logger.info("%s resuming temp file at offset %d of %d", context, offset, payload.size)
    t0 = time.monotonic()
    sent = await store.upload(temp, payload.source, offset, payload.size)
    t1 = time.monotonic()
    verified, digest, note = await _verify(store, temp, payload, verify)
    await store.durable(temp)
    t2 = time.monotonic()
    remote = await _publish_temp(store, temp, final, alt, payload, on_conflict)
    await _publish_sidecar(store, payload, remote)
    await store.sync_dir(posixpath.dirname(final))
    return Outcome(remote_path=remote, verified=verified, remote_digest=digest, bytes_sent=sent,
                   resumed_from=offset, note=note, upload_s=t1 - t0, verify_s=t2 - t1)


async def _publish_sidecar(store: Store, payload: Payload, remote: str) -> None:
    """Write the sidecar next to the published file: temp name, then rename (replacing an older one).

    Runs after the data file's rename, so a watcher that sees the sidecar knows the data is
    complete; a re-delivery writes it again (a crash between the two renames loses nothing).
    """
    if payload.sidecar is None:
        return
    final = remote + SIDECAR_SUFFIX
    temp = temp_name(final, payload.delivery_id)
    await store.write_small(temp, payload.sidecar)
    await store.replace(temp, final)


async def _matches(store: Store, path: str, payload: Payload) -> tuple[bool, str | None]:
    """(same size and SHA-256 as the payload, digest); (False, None) when the digest is unavailable."""
    if await store.size_of(path) != payload.size:
        return False, None
    try:
        digest = await store.sha256(path)
    except DigestUnavailable:
        return False, None
    return digest == payload.sha256, digest


async def _already_published(store: Store, payload: Payload, final: str, alt: str | None) -> Outcome | None:
    """An Outcome if no upload is needed: ``final`` (or our keep-both name) already holds the payload.

    Without a remote digest only the keep-both name, which carries our delivery id, is trusted on
    size alone; a same-size file under the plain final name may be someone else's.
    """
    for path in (final, alt):
        if path is None:
            continue
        same, digest = await _matches(store, path, payload)
        if same:
            return Outcome(path, "sha256", digest, 0, payload.size, "already published; nothing sent")
        if path == alt and digest is None and await store.size_of(path) == payload.size:
            return Outcome(path, "size", None, 0, payload.size,
                           "already published (name carries the delivery id); remote sha256 "
                           "unavailable, size matched")
    return None


async def _verify(store: Store, temp: str, payload: Payload, verify: str) -> tuple[str, str | None, str]:
    """Confirm the temp file; on mismatch delete it and raise a retryable error."""
    note = ""
    if verify == "sha256":
        try:
            digest = await store.sha256(temp)
        except DigestUnavailable as e:
            note = f"remote sha256 unavailable ({e}); verified size only"
        else:
            if digest != payload.sha256:
                await store.remove(temp)
                raise DestinationError(f"sha256 mismatch after upload (remote {digest[:16]}..., expected "
                                       f"{payload.sha256[:16]}...); temp file deleted", retryable=True)
            return "sha256", digest, note
    size = await store.size_of(temp)
    if size != payload.size:
        await store.remove(temp)
        raise DestinationError(f"size mismatch after upload (remote {size}, expected {payload.size}); "
                               "temp file deleted", retryable=True)
    return "size", None, note


async def _publish_temp(store: Store, temp: str, final: str, alt: str, payload: Payload,
                        on_conflict: str) -> str:
    """Rename the verified temp file into place following ``on_conflict``; return the final path."""
    if on_conflict == "overwrite":
        await store.replace(temp, final)
        return final
    if await store.link_new(temp, final):
        return final
    # The final name exists. Identical content (e.g. a crash between link and unlink) is ours.
    if (await _matches(store, final, payload))[0]:
        await store.remove(temp)
        return final
    if on_conflict == "rename":
        await store.replace(temp, alt)
        return alt
    await store.remove(temp)
    raise DestinationError(f"{final} already exists (on_conflict: fail)", retryable=False)
