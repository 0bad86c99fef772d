"""Prometheus metrics of one service instance, in its own registry (no module-level state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Requests by route template and status, queue depth, edits in flight, images held, UNet rows per call and
    padding rows, the wait to join, latency per stage."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, open fds, CPU seconds (Linux)
        self.requests = Counter("ip2p_requests", "HTTP requests answered", ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram("ip2p_request_seconds", "wall time of a request, by route", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("ip2p_queue_depth", "edits waiting for the worker", registry=self.registry)
        self.in_flight = Gauge("ip2p_edits_in_flight", "edits being denoised now", registry=self.registry)
        self.held_bytes = Gauge("ip2p_held_bytes", "bytes of images held by queued and finished jobs",
                                registry=self.registry)
        self.batch_size = Histogram("ip2p_batch_size", "UNet rows per call (guidance branches count as rows)",
                                    buckets=tuple(range(1, max_batch + 1)), registry=self.registry)
        self.padded_rows = Counter("ip2p_padded_rows", "rows added to fill a static bundle's call (outputs dropped)",
                                   registry=self.registry)
        self.join_wait = Histogram("ip2p_join_wait_seconds", "seconds an edit waited in the queue to join the loop",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("ip2p_stage_seconds", "seconds per pipeline or server stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
