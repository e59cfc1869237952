"""What ``adafuse serve`` counts, in Prometheus' text exposition format (``GET /metrics``): requests by status,
request latency, the rows of each batched forward pass, and rows per adapter or fusion."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows per forward pass


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        return [*out, f"{name}_sum {self.total}", f"{name}_count {self.n}"]


class ServeMetrics:
    """Thread-safe counters of one server process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[int] = Counter()  # HTTP status -> requests
        self.rows: Counter[str] = Counter()  # adapter or fusion -> rows served
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)

    def request(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[status] += 1
            self.latency.observe(seconds)

    def batch(self, tasks: list[str]) -> None:
        with self.lock:
            self.batch_rows.observe(len(tasks))
            self.rows.update(tasks)

    def text(self) -> str:
        with self.lock:
            lines = ["# TYPE adafuse_requests_total counter"]
            lines += [f'adafuse_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            errors = sum(n for s, n in self.requests.items() if s >= 400)
            lines += ["# TYPE adafuse_request_errors_total counter", f"adafuse_request_errors_total {errors}"]
            lines += ["# TYPE adafuse_request_latency_seconds histogram"]
            lines += self.latency.lines("adafuse_request_latency_seconds")
            lines += ["# TYPE adafuse_batch_rows histogram", *self.batch_rows.lines("adafuse_batch_rows")]
            lines += ["# TYPE adafuse_rows_total counter"]
            lines += [f'adafuse_rows_total{{name="{name}"}} {n}' for name, n in sorted(self.rows.items())]
        return "\n".join(lines) + "\n"
