"""What the web and worker processes say about themselves over HTTP while a benchmark runs:
the samples on their /metrics pages, quantiles estimated from two scrapes of a histogram,
and a /health probe that shows when the web worker's event loop stalls."""

from __future__ import annotations

import contextlib
import http.client
import re
import threading
import time

from common import http_request, percentile


def scrape(port: int) -> dict[str, float]:
    """Switchboard's samples on a /metrics page, by their full name with labels."""
    try:
        status, body = http_request(port, "GET", "/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    samples = {}
    for line in body.decode().splitlines():
        if line.startswith("switchboard_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float, **labels: str
) -> tuple[float, int]:
    """Prometheus-style estimate (linear within a bucket) from the buckets' increase
    between two scrapes, over the series matching `labels`."""
    ordered = _increase_by_bucket(before, after, name, **labels)
    if not ordered or ordered[-1][1] <= 0:
        return float("nan"), 0
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in ordered:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower, int(total)
            inside = cumulative - below
            share = (rank - below) / inside if inside else 0.0
            return lower + (bound - lower) * share, int(total)
        lower, below = bound, cumulative
    return lower, int(total)


class HealthProbe:
    """GET /health on the web process every `interval` seconds over one keep-alive
    connection, from a thread of its own: a slow answer means the web worker's one event
    loop was stalled (a long garbage collection, CPU starvation, a blocking call), which
    delays every socket and request of the process at once."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port, self.interval = port, interval
        self.samples: list[tuple[float, float]] = []  # (sent at, seconds to answer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> HealthProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self._stop.wait(self.interval):
                sent = time.monotonic()
                try:
                    connection.request("GET", "/health")
                    connection.getresponse().read()
                except (OSError, http.client.HTTPException):
                    connection.close()
                    continue
                self.samples.append((sent, time.monotonic() - sent))
        finally:
            connection.close()

    def mark(self) -> None:
        """Remember the garbage collector's figures now, for `collector_summary`."""
        self._collector_before = scrape(self.port)

    def collector_summary(self) -> str:
        """The web worker's garbage collections since `mark()`, in one line."""
        return collector_summary(getattr(self, "_collector_before", {}), scrape(self.port))

    def summary(self, since: float) -> str:
        """The probes sent since the monotonic time `since`, in one line."""
        waits = [w for sent, w in self.samples if sent >= since]
        if not waits:
            return "no /health probes answered"
        stalls = sum(1 for w in waits if w > 0.1)
        return (
            f"/health probe every {self.interval * 1000:.0f} ms: p50 "
            f"{percentile(waits, 50) * 1000:.1f} ms, p99 {percentile(waits, 99) * 1000:.1f} ms, "
            f"max {max(waits) * 1000:.0f} ms, {stalls} of {len(waits)} over 100 ms"
        )


def _increase_by_bucket(
    before: dict[str, float], after: dict[str, float], name: str, **labels: str
) -> list[tuple[float, float]]:
    """(bucket bound, increase of its cumulative count) between two scrapes, by bound."""
    buckets: dict[float, float] = {}
    for key, value in after.items():
        match = _SAMPLE.fullmatch(key)
        if not match or match[1] != name + "_bucket":
            continue
        found = dict(_LABEL.findall(match[2] or ""))
        if any(found.get(k) != v for k, v in labels.items()) or "le" not in found:
            continue
        bound = float("inf") if found["le"] == "+Inf" else float(found["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    return sorted(buckets.items())


def longest_bound(
    before: dict[str, float], after: dict[str, float], name: str, **labels: str
) -> tuple[int, float]:
    """(observations, the smallest bucket bound holding all of them) between two scrapes."""
    ordered = _increase_by_bucket(before, after, name, **labels)
    if not ordered or ordered[-1][1] <= 0:
        return 0, 0.0
    total = ordered[-1][1]
    return int(total), next(bound for bound, cumulative in ordered if cumulative >= total)


def collector_summary(before: dict[str, float], after: dict[str, float]) -> str:
    """The web process's collections of each generation between two scrapes, with the
    bucket of the longest pause (`switchboard_gc_pause_seconds`)."""
    parts = []
    for generation in ("0", "1", "2"):
        count, longest = longest_bound(
            before, after, "switchboard_gc_pause_seconds", generation=generation
        )
        parts.append(f"gen{generation} {count}" + (f" (<= {longest * 1000:g} ms)" if count else ""))
    return "collections: " + ", ".join(parts)
