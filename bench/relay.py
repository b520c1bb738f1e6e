"""What the relay's own Python costs per request, without the kernel and the event loop.

One keep-alive client connection and one pooled instance connection with stand-in
transports (their write() keeps nothing): each round feeds a small GET into the client
side and a small JSON response into the instance side, the path a real request takes
through the relay (shared/mesh/relay/), minus the syscalls. Measured with the gateway's settings and the
sidecar's, then with one feature switched off at a time, so each feature's cost is the
difference from the full run measured in the same process. Best of several repeats (the
least disturbed by this noisy machine).

These are the figures to watch when changing the hot path; `make bench-gateway` says
what they are worth in requests/s. Run with `make bench-relay`.
"""

from __future__ import annotations

import argparse
import os
import time

import uvloop

from shared.mesh.balancing import Balancer
from shared.mesh.relay import Relay, RelaySettings, Route
from shared.mesh.relay.upstream import UpstreamSide
from shared.mesh.telemetry import AccessLog, RelayMetrics

REQUEST = b"GET /api/v1/bench/ HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nUser-Agent: wrk\r\n\r\n"
# The same request as the gateway passes it on to a sidecar.
FORWARDED = REQUEST[:-2] + (
    b"X-Request-Id: 4bf92f3577b34da6a3ce929d0e0e4736\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: 127.0.0.1:3000\r\n\r\n")
BODY = b'{"message": "hello", "items": [1, 2, 3], "ok": true}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nDate: Tue, 24 Nov 2026 22:00:00 GMT\r\n"
            b"Server: Python/3.11 aiohttp/3.14.5\r\n\r\n" % len(BODY) + BODY)

# kind: (the settings services/gateway or sidecar/main give it, the request it gets, the
# features measured by switching them off one at a time)
KINDS = {
    "gateway": (dict(forwarded=True, echo_request_id=True, max_body=1 << 20), REQUEST,
                ("access log", "forwarded", "echo_request_id", "traceparent", "request_id")),
    "sidecar": ({}, FORWARDED, ("access log",)),
}


class StandIn:
    """A transport that accepts everything and sends nothing."""

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def per_request(settings: RelaySettings, request: bytes, access_log: bool, requests: int,
                      repeats: int) -> float:
    """Best µs per request over `repeats` runs of `requests`."""
    balancer = Balancer("bench")
    balancer.update([("bench-1", "127.0.0.1", 9, {})])
    route = Route("bench", balancer)
    log = AccessLog("bench", "bench.1", fd=os.open(os.devnull, os.O_WRONLY)) if access_log else None
    relay = Relay(settings, lambda method, target: route, RelayMetrics("bench"), log)
    client = relay.protocol()
    client.connection_made(StandIn())
    upstream = UpstreamSide(balancer.backends[0])
    upstream.connection_made(StandIn())
    balancer.backends[0].idle.append(upstream)
    best = float("inf")
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(requests):
                client.data_received(request)
                upstream.data_received(RESPONSE)
            best = min(best, (time.perf_counter() - started) / requests)
        if client.busy or relay.metrics.requests.get(("bench", 200)) != requests * repeats:
            raise RuntimeError("a request was not relayed to the end: the stand-ins no longer match the relay")
    finally:
        relay.close()
        if log is not None:
            os.close(log.fd)
    return best * 1e6


async def main(requests: int, repeats: int) -> None:
    print(f"relay Python per request, {requests} requests x best of {repeats}, stand-in transports (no syscalls)")
    for kind, (options, request, switches) in KINDS.items():
        full = await per_request(RelaySettings(kind, **options), request, True, requests, repeats)
        print(f"\n{kind}: {full:.2f} us per request (every feature it runs with)")
        for switch in switches:
            if switch == "access log":
                settings, log = RelaySettings(kind, **options), False
            else:
                settings, log = RelaySettings(kind, **{**options, switch: False}), True
            without = await per_request(settings, request, log, requests, repeats)
            print(f"  {switch:16s} {full - without:5.2f} us ({(full - without) / full:4.0%} of the request)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.repeats))
