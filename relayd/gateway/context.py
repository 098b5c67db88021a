"""Services shared by every SSH connection of one gateway process."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from relayd.config import Config, TenantConfig, UserConfig
from relayd.gateway.quota import TenantUsage
from relayd.metrics import Metrics
from relayd.spool import Spool, scan_usage

__all__ = ["GatewayContext", "Identity"]


@dataclass(frozen=True)
class Identity:
    """An authenticated login: who, for which tenant, from where."""

    user: UserConfig
    tenant: TenantConfig
    remote: str
    conn_id: str


@dataclass
class GatewayContext:
    """Config (swapped whole on reload), spool, quota usage and session counts."""

    config: Config
    spool: Spool
    usage: dict[str, TenantUsage] = field(default_factory=dict)
    sessions: Counter[str] = field(default_factory=Counter)
    per_ip: Counter[str] = field(default_factory=Counter)
    startups: int = 0
    digests: dict[tuple[int, int, int, int, int], str] = field(default_factory=dict)
    draining: bool = False
    connections: dict[Any, Any] = field(default_factory=dict)
    uploads: set[Any] = field(default_factory=set)
    on_commit: Callable[[], None] | None = None   # the relay's wake-up call
    metrics: Metrics | None = None

    def prepare_tenants(self) -> None:
        """Create spool folders for every configured tenant and (re)count their usage."""
        for name in self.config.tenants:
            dirs = self.spool.ensure_tenant(name)
            if name not in self.usage:
                nbytes, files = scan_usage(dirs.inbox)
                self.usage[name] = TenantUsage(bytes=nbytes, files=files)

    def usage_of(self, tenant: str) -> TenantUsage:
        """Usage counters of ``tenant``."""
        return self.usage.setdefault(tenant, TenantUsage())
