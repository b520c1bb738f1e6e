"""What a relay is told: its settings (RelaySettings) and where a request goes (Route).

Plain data, read by every module of the relay and built by its users (the sidecar's
inbound and upstream listeners, the gateway, shared.mesh.discovery.route_to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.mesh.balancing import Balancer

if TYPE_CHECKING:
    from shared.mesh.mtls import Outbound


@dataclass
class Route:
    """Where a request goes: a balancer over the instances of one service."""

    name: str
    balancer: Balancer
    connect_timeout: float = 2.0
    request_timeout: float = 30.0
    retries: int = 2
    # The service honours Idempotency-Key (shared.mesh.discovery.honours_idempotency_key):
    # a request carrying one may be resent like an idempotent one.
    idempotency_key: bool = False
    # mTLS to its instances (shared.mesh.mtls.Outbound): our leaf presented, the server's
    # proven to be an instance of `name`. None: plain (an app on this host, or mtls off).
    tls: Outbound | None = None


@dataclass
class RelaySettings:
    listener: str  # name in logs and metrics: "inbound", "upstream", "gateway"
    request_id: bool = True  # add X-Request-Id when absent
    traceparent: bool = True  # start a W3C trace when the request carries none
    forwarded: bool = False  # add X-Forwarded-For/Proto/Host, drop hop-by-hop headers
    echo_request_id: bool = False  # return X-Request-Id on responses that lack it
    max_body: int | None = None  # 413 above this many bytes
    idle_timeout: float = 75.0  # close client keep-alive connections idle this long
    # A request head must be whole this long after the connection was accepted, or after
    # its first bytes on a kept-alive one: else 408 (a quiet close if no byte came at all).
    header_timeout: float = 10.0
    max_idle_per_backend: int = 64
