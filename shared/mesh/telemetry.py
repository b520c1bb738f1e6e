"""What the relay observes per request: Prometheus metrics and a structured access log.

Both sit on the hot path, so the path itself only bumps plain counters and appends
pre-encoded lines; prometheus_client renders the counters when /metrics is scraped, and
the access log is written in batches (one write per 100 ms, not one per request).

The access log is what `supervisor trace` reads (supervisor/trace.py): one `request` line
per request and listener (the gateway's, a sidecar's inbound and upstream listeners, an
app's own, `listener: "app"`), written at its end: `ts` is the end (to the microsecond),
`ts - duration_ms` the start. A request that was retried also gets one `attempt` line per
failed attempt (AttemptLine), written as the attempt fails; a request answered at the
first attempt gets none, so that costs nothing more.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections.abc import Callable, Iterable

import msgspec
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Latency:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0


class RelayMetrics:
    """Counters by route: requests by status, latency histogram, upstream errors, retries,
    and the ejections of the balancers that `balancers` returns (shared.mesh.balancing,
    named after the service they pick instances of; set by the relay's owner)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.balancers: Callable[[], Iterable] = tuple
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Latency] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = _Latency()
        hist.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        hist.total += seconds
        hist.count += 1

    def upstream_error(self, route: str, kind: str) -> None:
        key = (route, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def retry(self, route: str) -> None:
        self.retries[route] = self.retries.get(route, 0) + 1

    # prometheus_client collector protocol
    def collect(self):
        p = self.prefix
        requests = CounterMetricFamily(f"{p}_requests", "Requests relayed, by route and status code",
                                       labels=["route", "status"])
        for (route, status), value in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], value)
        yield requests
        latency = HistogramMetricFamily(f"{p}_request_duration_seconds",
                                        "Time from request head to response end", labels=["route"])
        for route, hist in sorted(self.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), hist.counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([route], buckets, hist.total)
        yield latency
        errors = CounterMetricFamily(f"{p}_upstream_errors", "Failed attempts to reach an instance",
                                     labels=["route", "kind"])
        for (route, kind), value in sorted(self.upstream_errors.items()):
            errors.add_metric([route, kind], value)
        yield errors
        retries = CounterMetricFamily(f"{p}_retries", "Requests retried on another instance", labels=["route"])
        for route, value in sorted(self.retries.items()):
            retries.add_metric([route], value)
        yield retries
        ejections = CounterMetricFamily(f"{p}_ejections", "Instances ejected after consecutive failures",
                                        labels=["route"])
        ejected = GaugeMetricFamily(f"{p}_ejected_instances", "Instances ejected now", labels=["route"])
        for balancer in sorted(self.balancers(), key=lambda b: b.name):
            ejections.add_metric([balancer.name], balancer.ejections)
            ejected.add_metric([balancer.name], balancer.ejected())
        yield ejections
        yield ejected

    def render(self, extra: CollectorRegistry | None = None) -> bytes:
        text = generate_latest(self.registry)
        return text + generate_latest(extra) if extra is not None else text


class _RequestLine(msgspec.Struct):
    """What every access-log line of a request says (fields in this order on the wire)."""

    ts: float
    level: str
    msg: str
    service: str
    instance: str
    listener: str
    method: str
    path: str
    status: int
    duration_ms: float
    upstream: str
    request_id: str


class AccessLine(_RequestLine):
    retries: int


class AttemptLine(_RequestLine):
    """A failed attempt of a request that was retried (or answered after retries).

    `attempt` counts from 1; `error` is the kind of failure (connect_refused,
    connect_timeout, reset, closed, bad_response, timeout, status_502, status_503) and
    `status` the instance's answer when it gave one (status_5xx), else 0. The span is
    `ts - duration_ms` to `ts`.
    """

    attempt: int
    error: str


class AccessLog:
    """One JSON line per request on stdout (the supervisor files it), written in batches.

    The path is logged without its query string: queries can carry secrets.
    """

    def __init__(self, service: str, instance: str, fd: int = 1, interval: float = 0.1) -> None:
        self.service = service
        self.instance = instance
        self.fd = fd
        self.interval = interval
        self.enabled = True
        # Lines are encoded straight onto the end of one buffer (msgspec's encode_into):
        # no bytes object, concatenation and list entry per line, no join per flush.
        self._buffer = bytearray()
        self._scheduled = False
        self._encode_into = msgspec.json.Encoder().encode_into

    def record(self, listener: str, method: str, target: str, status: int, seconds: float,
               upstream: str, request_id: str, retries: int) -> None:
        if not self.enabled:
            return
        path = target.partition("?")[0]
        buffer = self._buffer
        size = len(buffer)
        try:
            # Rounded as round(x * 10**k) / 10**k: the nearest double of such a number
            # prints as just those digits, at a third of round(x, k)'s cost (which goes
            # through a decimal string); this runs once per request. The time to the
            # microsecond, as the duration: `supervisor trace` orders hops by start.
            self._encode_into(AccessLine(
                round(time.time() * 1e6) / 1e6, "info", "request", self.service, self.instance, listener,
                method, path, status, round(seconds * 1e6) / 1000, upstream, request_id, retries,
            ), buffer, -1)
        except Exception:  # msgspec may have grown the buffer already: never flush a torn line
            del buffer[size:]
            raise
        buffer += b"\n"
        if len(buffer) > 65536:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.interval, self.flush)

    def attempt(self, listener: str, method: str, target: str, status: int, seconds: float,
                upstream: str, request_id: str, attempt: int, error: str) -> None:
        """A failed attempt of a request that is, or was, retried: off the hot path."""
        if not self.enabled:
            return
        line = msgspec.json.encode(AttemptLine(
            round(time.time() * 1e6) / 1e6, "warning", "attempt", self.service, self.instance, listener, method,
            target.partition("?")[0], status, round(seconds * 1e6) / 1000, upstream, request_id, attempt, error))
        self._buffer += line + b"\n"
        if len(self._buffer) > 65536:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        buffer = self._buffer
        if not buffer:
            return
        try:
            os.write(self.fd, buffer)
        except OSError:
            pass  # nobody reads our output any more: not a reason to stop serving
        finally:
            buffer.clear()
