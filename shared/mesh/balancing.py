"""Pick a healthy instance: power of two choices on least outstanding requests, with
temporary ejection of instances that keep failing.

The live set comes from discovery (Consul); state per instance (in-flight count,
consecutive failures, idle connections) survives updates of that set for instances that
stay in it.

An attempt holds the instance it was picked through a Lease, settled exactly once with
a verdict: succeeded, failed, or released without one (the client went away, the
connection rather than the instance failed, the request became a WebSocket tunnel).
Settling is the only place where an instance's in-flight and failure counts change, so
a request can neither leak an in-flight slot nor count twice (linkerd2-proxy wraps each
endpoint the same way).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from shared.mesh.local import reachable_socket


class Backend:
    """One instance as the balancer sees it."""

    __slots__ = ("key", "host", "port", "address", "meta", "socket", "socket_retry_at", "inflight", "failures",
                 "ejected_until", "idle", "removed")

    def __init__(self, key: str, host: str, port: int, meta: dict[str, str] | None = None) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"  # logged per request: computed once
        self.meta = meta or {}
        # An instance on this host that announces a Unix socket is reached through it
        # (shared.mesh.local); None: through host:port.
        self.socket = reachable_socket(self.meta)
        self.socket_retry_at = 0.0  # after a failed connect through it: TCP until then (monotonic)
        self.inflight = 0  # leases not settled yet
        self.failures = 0  # consecutive
        self.ejected_until = 0.0
        self.idle: list = []  # keep-alive connections ready for reuse (relay.upstream.UpstreamSide; see relay.pool)
        self.removed = False

    def __repr__(self) -> str:
        return f"Backend({self.key} {self.address} inflight={self.inflight} failures={self.failures})"


class Balancer:
    def __init__(self, name: str, *, eject_after: int = 3, eject_for: float = 10.0) -> None:
        self.name = name
        self.eject_after = eject_after
        self.eject_for = eject_for
        self.backends: list[Backend] = []
        self._by_key: dict[str, Backend] = {}
        self.known = False  # at least one answer from discovery arrived
        self.ejections = 0  # instances ejected so far (a counter for the metrics)

    def update(self, members: Iterable[tuple[str, str, int, dict[str, str]]]) -> None:
        """Replace the set with (key, host, port, meta) tuples; keep state of those that stay."""
        fresh: dict[str, Backend] = {}
        for key, host, port, meta in members:
            old = self._by_key.get(key)
            if old is not None and old.host == host and old.port == port:
                old.meta = meta
                old.socket = reachable_socket(meta)
                fresh[key] = old
            else:
                fresh[key] = Backend(key, host, port, meta)
        for key, old in self._by_key.items():
            if fresh.get(key) is not old:
                old.removed = True
                for conn in old.idle:
                    conn.close()
                old.idle.clear()
        self._by_key = fresh
        self.backends = list(fresh.values())
        self.known = True

    def pick(self, exclude: tuple[Backend, ...] = ()) -> Backend | None:
        """Two random candidates, the one with fewer requests in flight wins.

        Ejected instances are skipped unless every candidate is ejected: then serving
        from a suspect instance beats refusing everything (Envoy's panic threshold idea).
        """
        backends = self.backends
        if len(backends) == 1 and not exclude:
            return backends[0]
        now = time.monotonic()
        candidates = [b for b in backends if b not in exclude and b.ejected_until <= now]
        if not candidates:
            candidates = [b for b in backends if b not in exclude]
            if not candidates:
                return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return a if a.inflight <= b.inflight else b

    # The verdicts, given through Lease.

    def succeeded(self, backend: Backend) -> None:
        backend.failures = 0

    def failed(self, backend: Backend) -> None:
        backend.failures += 1
        if backend.failures >= self.eject_after:
            backend.ejected_until = time.monotonic() + self.eject_for
            backend.failures = 0
            self.ejections += 1

    def ejected(self) -> int:
        now = time.monotonic()
        return sum(1 for b in self.backends if b.ejected_until > now)


class Lease:
    """A hold on one instance for one attempt of a request, from the pick to its verdict.

    `take` holds the instance (one more in flight); then exactly one of `succeeded`,
    `failed` or `released` settles it, and settling again is a no-op. A holder takes the
    same Lease again for its next attempt once it is settled: the relay keeps one per
    client connection, as it keeps its request parser, because an object built per
    request costs about 1.5k instructions, 1.6 % of a sidecar request's Python
    (bench/relay.py under cachegrind).
    """

    __slots__ = ("balancer", "backend", "held")

    def __init__(self) -> None:
        self.balancer: Balancer | None = None
        self.backend: Backend | None = None  # the instance of the last take, settled or not
        self.held = False

    def take(self, balancer: Balancer, backend: Backend) -> Lease:
        if self.held:
            raise RuntimeError(f"lease on {self.backend!r} taken again before it was settled")
        self.balancer = balancer
        self.backend = backend
        self.held = True
        backend.inflight += 1
        return self

    def succeeded(self) -> None:
        if self.held:
            self.held = False
            backend = self.backend
            backend.inflight -= 1
            backend.failures = 0  # Balancer.succeeded written out: this runs once per request

    def failed(self) -> None:
        if self.held:
            self.held = False
            self.backend.inflight -= 1
            self.balancer.failed(self.backend)

    def released(self) -> None:
        """Settled without a verdict on the instance."""
        if self.held:
            self.held = False
            self.backend.inflight -= 1
