"""Prometheus metrics: cheap counters on the hot paths, journal gauges computed at scrape time.

One :class:`Metrics` object per daemon, with its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one, so tests and several daemons in one process stay apart). The
gateway, the spool and the relay only increment counters, set gauges or observe histograms: a
dict lookup and a short lock inside prometheus_client, nothing else on the event loop. The
queue gauges (depth per destination and state, age of the oldest waiting delivery, failed and
quarantined counts) are read from the journal by :class:`_QueueCollector` in the HTTP server's
thread when Prometheus scrapes; the snapshot function is handed in, so this module knows nothing
of the journal (it sits below it in DESIGN.md's layers).

Names follow ``relayd_<subsystem>_<name>_<unit>``; counters end in ``_total``; label values come
from small fixed sets or from the config (tenant and destination names), never from paths,
user names or addresses. The list with meanings is in docs/operations.md.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from relayd import __version__

__all__ = ["Metrics", "MetricsServer", "QueueSnapshot", "WAITING_STATES", "SIZE_BUCKETS", "DURATION_BUCKETS"]

log = logging.getLogger("relayd.metrics")

WAITING_STATES = ("pending", "retry_wait", "sending")
"""Delivery states that are still on their way (the queue)."""

SIZE_BUCKETS = (1024.0, 16 * 1024.0, 256 * 1024.0, 1 << 20, 16 << 20, 128 << 20, 1 << 30, 8 << 30, 64 << 30)
"""Bytes: 1 KiB, 16 KiB, 256 KiB, 1 MiB, 16 MiB, 128 MiB, 1 GiB, 8 GiB, 64 GiB."""

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Seconds, from 10 ms (a small local file) to an hour (a large file over a slow link)."""


@dataclass(frozen=True)
class QueueSnapshot:
    """The journal's view of deliveries not yet delivered, at one moment.

    ``by_destination`` maps destination → state → count for the states that need watching
    (pending, retry_wait, sending, failed, quarantined, denied); ``oldest_waiting_created`` is
    the creation time (unix seconds) of the oldest delivery still waiting, or None.
    """

    by_destination: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    oldest_waiting_created: float | None = None
    configured: tuple[str, ...] = ()
    """Destinations in the config: exported with zeros when nothing waits for them."""

    def total(self, state: str) -> int:
        """Deliveries in ``state`` over all destinations."""
        return sum(states.get(state, 0) for states in self.by_destination.values())


class _QueueCollector(Collector):
    """Queue gauges computed from a journal snapshot at scrape time (in the scrape thread)."""

    def __init__(self, snapshot: Callable[[], QueueSnapshot]):
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() (a journal read) at registration.
        return self._families(None, 1)

    def collect(self) -> Iterable[Metric]:
        try:
            snap = self._snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer; say the journal is unreadable
            log.warning("metrics: cannot read the journal: %s", exc)
            return self._families(None, 0)
        return self._families(snap, 1)

    @staticmethod
    def _families(snap: QueueSnapshot | None, up: int) -> list[Metric]:
        depth = GaugeMetricFamily("relayd_queue_depth", "Deliveries waiting or being sent, by destination and "
                                  "state (pending, retry_wait, sending).", labels=["destination", "state"])
        oldest = GaugeMetricFamily("relayd_queue_oldest_pending_age_seconds", "Age of the oldest delivery not yet "
                                   "delivered (pending, retry_wait or sending); 0 when the queue is empty.")
        failed = GaugeMetricFamily("relayd_deliveries_failed", "Deliveries that gave up (failed) and wait for "
                                   "`relayd retry` or `relayd cancel`.", labels=["destination"])
        quarantined = GaugeMetricFamily("relayd_deliveries_quarantined", "Deliveries held in quarantine.",
                                        labels=["destination"])
        readable = GaugeMetricFamily("relayd_journal_readable", "1 if the queue gauges could be read from the "
                                     "journal at this scrape, else 0.")
        readable.add_metric([], up)
        if snap is not None:
            names = sorted(set(snap.by_destination) | set(snap.configured))
            for dest in names:
                states = snap.by_destination.get(dest, {})
                for state in WAITING_STATES:
                    depth.add_metric([dest, state], states.get(state, 0))
                failed.add_metric([dest], states.get("failed", 0))
                quarantined.add_metric([dest], states.get("quarantined", 0))
            age = 0.0 if snap.oldest_waiting_created is None else max(0.0, time.time() - snap.oldest_waiting_created)
            oldest.add_metric([], age)
        return [depth, oldest, failed, quarantined, readable]


class MetricsServer:
    """The HTTP endpoint (prometheus_client's threaded WSGI server) for one registry."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server = server
        self._thread = thread
        self.address: tuple[str, int] = server.server_address[:2]  # type: ignore[assignment]

    def close(self) -> None:
        """Stop serving and release the port (blocks until the serving thread ends)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Metrics:
    """All of relayd's metrics in one registry. Thread-safe; cheap to update."""

    def __init__(self, node_id: str = "relayd", registry: CollectorRegistry | None = None):
        # No `<counter>_created` series (one more series per counter for nothing Prometheus uses).
        # A switch of prometheus_client for the whole process; relayd has no other metrics.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge("relayd_build_info", "Always 1; labels name the relayd and Python versions and "
                                "the node id.", ["version", "python_version", "node"], registry=r)
        self.build_info.labels(__version__, platform.python_version(), node_id).set(1)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        # gateway
        self.connections_active = Gauge("relayd_connections_active", "Open SSH connections (authenticated or "
                                        "not).", registry=r)
        self.connections_refused = Counter("relayd_connections_refused_total", "Connections dropped at once by "
                                           "max_startups or max_connections_per_ip.", registry=r)
        self.sessions_active = Gauge("relayd_sessions_active", "Open SFTP/SCP sessions.", registry=r)
        self.uploads_active = Gauge("relayd_uploads_active", "Upload handles open (not yet committed).",
                                    registry=r)
        self.auth_attempts = Counter("relayd_auth_attempts_total", "Authentication attempts by method "
                                     "(publickey, password, publickey-cert) and result (success, failure).",
                                     ["method", "result"], registry=r)
        # commit door
        self.received_files = Counter("relayd_received_files_total", "Files committed (uploads, peer "
                                      "deliveries, drop folders), by tenant.", ["tenant"], registry=r)
        self.received_bytes = Counter("relayd_received_bytes_total", "Bytes of committed files, by tenant.",
                                      ["tenant"], registry=r)
        # relay
        self.deliveries = Counter("relayd_deliveries_total", "Delivery attempts by destination and result "
                                  "(delivered, retry, failed, interrupted).", ["destination", "result"], registry=r)
        self.delivery_bytes = Counter("relayd_delivery_sent_bytes_total", "Bytes sent to destinations (after "
                                      "delta encoding; resumed parts are not sent again).", ["destination"],
                                      registry=r)
        self.delivery_size = Histogram("relayd_delivery_size_bytes", "Size of each delivered file.",
                                       ["destination"], buckets=SIZE_BUCKETS, registry=r)
        self.delivery_duration = Histogram("relayd_delivery_duration_seconds", "Duration of each successful "
                                           "delivery attempt (connect, send, verify, rename).", ["destination"],
                                           buckets=DURATION_BUCKETS, registry=r)
        # daemon
        self.reloads = Counter("relayd_config_reloads_total", "SIGHUP reloads by result (success, failure).",
                               ["result"], registry=r)
        self.last_reload_ok = Gauge("relayd_config_last_reload_successful", "1 if the last reload applied (or "
                                    "there was none), 0 if it was rejected.", registry=r)
        self.last_reload_ok.set(1)
        self.start_time = Gauge("relayd_start_time_seconds", "When this relayd started (unix time).", registry=r)
        self.start_time.set(time.time())
        self._lock = threading.Lock()
        self._queue: _QueueCollector | None = None
        self._server: MetricsServer | None = None

    # -- wiring --------------------------------------------------------------------------------

    def watch_queue(self, snapshot: Callable[[], QueueSnapshot]) -> None:
        """Export the queue gauges, computed by ``snapshot()`` at each scrape (in the scrape thread)."""
        with self._lock:
            if self._queue is not None:
                self.registry.unregister(self._queue)
            self._queue = _QueueCollector(snapshot)
            self.registry.register(self._queue)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Start the HTTP endpoint on ``host:port`` (raises OSError if it cannot bind)."""
        self._server = MetricsServer(self.registry, host, port)
        return self._server

    def close(self) -> None:
        """Stop the HTTP endpoint, if one runs."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    # -- hot-path helpers ----------------------------------------------------------------------

    def auth(self, method: str, ok: bool) -> None:
        """Count one authentication attempt."""
        self.auth_attempts.labels(method, "success" if ok else "failure").inc()

    def committed(self, tenant: str, size: int) -> None:
        """Count one committed file of ``size`` bytes for ``tenant``."""
        self.received_files.labels(tenant).inc()
        self.received_bytes.labels(tenant).inc(size)

    def delivery(self, destination: str, result: str, *, size: int = 0, sent: int = 0,
                 seconds: float | None = None) -> None:
        """Count one delivery attempt; a ``delivered`` one also observes its size and duration."""
        self.deliveries.labels(destination, result).inc()
        if sent:
            self.delivery_bytes.labels(destination).inc(sent)
        if result == "delivered":
            self.delivery_size.labels(destination).observe(size)
            if seconds is not None:
                self.delivery_duration.labels(destination).observe(seconds)
