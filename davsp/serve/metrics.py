"""Prometheus metrics of one gateway (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("davsp_serve_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.latency = Histogram("davsp_serve_request_seconds", "time to the end of the answer (streams included)",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.framing = Histogram("davsp_serve_framing_seconds", "decoding, framing and re-encoding a request's images",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("davsp_serve_images_framed", "images framed with the VSP", registry=r)
        self.upstream_errors = Counter("davsp_serve_upstream_errors", "upstream failures by kind", ["reason"],
                                       registry=r)
        self.in_flight = Gauge("davsp_serve_in_flight", "chat requests being answered", registry=r)
        self.queue_depth = Gauge("davsp_serve_queue_depth", "--model: requests waiting for the model", registry=r)
        self.batch_size = Histogram("davsp_serve_batch_size", "--model: requests per generated batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
