"""Per-tenant usage accounting for quotas (in memory; rebuilt from the inbox at start).

All methods run on the event loop thread, so no locking is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TenantUsage", "QuotaExceeded"]


class QuotaExceeded(Exception):
    """A reservation would exceed the tenant's quota or file-size limit; ``str()`` is client-safe."""


@dataclass
class TenantUsage:
    """Bytes and files in a tenant's inbox, including uploads in progress."""

    bytes: int = 0
    files: int = 0

    def reserve_bytes(self, amount: int, limit: int | None) -> None:
        """Account ``amount`` more bytes or raise :class:`QuotaExceeded`."""
        if limit is not None and amount > 0 and self.bytes + amount > limit:
            raise QuotaExceeded(f"Quota exceeded: tenant byte quota is {limit} bytes")
        self.bytes += amount

    def reserve_file(self, limit: int | None) -> None:
        """Account one more file or raise :class:`QuotaExceeded`."""
        if limit is not None and self.files + 1 > limit:
            raise QuotaExceeded(f"Quota exceeded: tenant file quota is {limit} files")
        self.files += 1

    def release(self, nbytes: int = 0, files: int = 0) -> None:
        """Give back bytes and files (never below zero)."""
        self.bytes = max(0, self.bytes - nbytes)
        self.files = max(0, self.files - files)
