"""mTLS on the hops the mesh owns: what the relay asks on each side of a connection.

- `Inbound` (a sidecar's public listener, TCP and its abstract Unix socket alike): the
  TLS layer accepts only a client certificate that chains to the Connect CA (a plain
  HTTP client, a certificate of another CA, a self-signed or an expired one never get
  past the handshake, so never reach the app); then the client's service, read from its
  SPIFFE URI in our trust domain, must be allowed by the intentions (shared.mesh.authorize).
  `admit` answers at once from the decisions already made (the common case: one question
  per calling service, not per connection); otherwise the connection waits, not reading,
  until the agent answered.
- `Outbound` (the gateway's and a sidecar's connections to instances): presents this
  process's own leaf and checks that the server's certificate names the service the
  request is meant for (a leaf has no host name: the URI is what identifies it).

Both take their TLS contexts from shared.mesh.identity at the moment a connection is
made, so a renewed leaf or a rotated CA applies to new connections while open ones carry on.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import httptools

from shared.mesh.authorize import Authorizer, Decision
from shared.mesh.identity import Identity, peer_uri, service_of

# A connection whose peer is not of our trust domain: never asked, always refused.
FOREIGN = Decision("")
FOREIGN.reason = "not a Connect identity of this cluster"


def _serial(ssl_object: Any) -> str:
    """The peer certificate's serial in the colon-hex form the authorize API takes."""
    text = (ssl_object.getpeercert() or {}).get("serialNumber", "")
    text = text if len(text) % 2 == 0 else "0" + text
    return ":".join(text[i:i + 2] for i in range(0, len(text), 2)).lower()


class Inbound:
    def __init__(self, identity: Identity, authorizer: Authorizer) -> None:
        self.identity = identity
        self.authorizer = authorizer

    @property
    def context(self) -> ssl.SSLContext:
        """For the listening socket: it hands each handshake the current leaf and roots."""
        return self.identity.front

    def admit(self, transport: asyncio.BaseTransport, decided: Callable[[Decision], None]) -> Decision | None:
        """The decision for a new connection's client, or None while the agent is asked:
        `decided(decision)` follows then (unless the connection closed meanwhile)."""
        ssl_object = transport.get_extra_info("ssl_object")
        uri = peer_uri(ssl_object)
        if not service_of(uri, self.identity.trust_domain):
            return FOREIGN
        known = self.authorizer.known(uri)
        if known is not None:
            return known
        task = asyncio.get_running_loop().create_task(self.authorizer.decide(uri, _serial(ssl_object)))

        def done(finished: asyncio.Task) -> None:
            if not finished.cancelled() and finished.exception() is None and not transport.is_closing():
                decided(finished.result())

        task.add_done_callback(done)
        return None


class Outbound:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def context(self) -> ssl.SSLContext:
        return self.identity.client_context()

    def serves(self, transport: asyncio.BaseTransport, service: str) -> bool:
        """Whether the server of a new connection proved to be an instance of `service`."""
        return self.identity.peer_service(transport.get_extra_info("ssl_object")) == service

    async def get(self, host: str, port: int, service: str, path: str, timeout: float) -> tuple[int, bytes]:
        """One GET over mTLS to an instance of `service` (off the hot path: the gateway's
        OpenAPI fetches); (status, body). OSError if the server is not `service`."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=self.context(), server_hostname="")
            try:
                if not self.serves(writer.transport, service):
                    raise ConnectionRefusedError(f"{host}:{port} did not prove to be an instance of {service}")
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {service}\r\nConnection: close\r\n\r\n".encode())
                response = _Response()
                parser = httptools.HttpResponseParser(response)
                while not response.done and (data := await reader.read(65536)):
                    parser.feed_data(data)
                return parser.get_status_code(), b"".join(response.body)
            finally:
                writer.close()


class _Response:
    """httptools' callbacks for Outbound.get: the body, and whether it is complete."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True
