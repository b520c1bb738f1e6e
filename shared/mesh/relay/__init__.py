"""The fast HTTP/1.1 forwarding path, shared by the sidecar and the gateway.

Design, for CPU per request rather than convenience:
- bytes are relayed at the transport level (asyncio Protocols, no per-request task);
- a request head is found with bytes.find, validated by httptools (llhttp, C), and
  forwarded with the few header lines we add spliced in, never rebuilt;
- bodies are streamed as they arrive, framed by Content-Length counting or by the
  parser for chunked bodies, with flow control in both directions (no full buffering);
- responses are relayed as received; only the status line and framing are looked at;
- connections to instances are kept alive and pooled per instance, and go through a
  Unix socket to an instance on this host that offers one (shared.mesh.local) and, from a
  sidecar, to an app that listens on one.

Around that: picking an instance (shared.mesh.balancing), retries on another instance when
a connection fails (any method: nothing was sent) or, for idempotent methods and requests
carrying an Idempotency-Key to a service that honours it, when the instance answers
502/503 or drops the connection before answering; connect and request
timeouts; errors in the shared JSON shape; X-Request-Id and traceparent propagation;
WebSocket (Upgrade) tunnelling; draining.

The modules, one idea each (each imports only those above it):
- settings: RelaySettings and Route, what a relay is told;
- http1: header lookups and message framing, pure functions both sides call;
- headers: the header lines added to and dropped from a request, bytes in, bytes out;
- retry: the one decision whether a failed attempt is tried again;
- upstream: UpstreamSide, a connection to an instance, and the `Client` interface
  through which it reports to the client side;
- pool: idle connections per instance, and opening one (Unix socket, TCP fallback);
- exchange, forwarding, client: ClientSide, a client's connection, in three layers: its
  state and how an exchange ends (the answer), getting the request to an instance
  (the attempts), and the Protocol with the request loop (see relay.exchange);
- listener: Relay, the listening relay: connections, idle and deadline sweeps, draining.
"""

from shared.mesh.relay.http1 import MAX_HEAD
from shared.mesh.relay.listener import Relay
from shared.mesh.relay.settings import RelaySettings, Route

__all__ = ["MAX_HEAD", "Relay", "RelaySettings", "Route"]
