"""This process's Connect identity: its service's leaf certificate and the CA's trust
bundle, followed through Consul, turned into TLS contexts for mTLS between mesh members.

- The leaf (`/v1/agent/connect/ca/leaf/<service>`, needs service:write: the process's own
  ACL token) and the roots (`/v1/agent/connect/ca/roots`) are each followed with a
  blocking query (shared.mesh.watch's loop): the agent answers again when it renewed
  the leaf (at 60-90 % of its lifetime) or the roots changed (a CA rotation).
- Every root of the bundle is trusted, not only the active one: a root rotated out stays
  valid for the leaves it signed until they expire, and peers renew at their own pace.
- A change builds new contexts; connections already open keep theirs (an SSL object
  holds its own reference), new ones get the new. The server side swaps through the SNI
  callback of one fixed "front" context (the listening socket keeps that object for
  good); the client side asks `client_context()` per connection.
- A fetch that fails keeps the last good leaf and roots (`problem` says what is wrong, for
  `supervisor status` and the logs): an agent restart or a server outage must not stop
  the traffic. The agent itself answers leaf and roots from its cache.
- Private keys never touch the disk: `load_cert_chain` only takes paths, so the PEM goes
  through an anonymous memory file (`memfd_create`) read as /proc/self/fd/N.
- Leaves carry only the SPIFFE URI SAN (`spiffe://<trust domain>/ns/default/dc/<dc>/svc/
  <name>`), no DNS or IP name: host names are not checked; the URI is, by `peer_service`.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from typing import Any

import consul.aio
import msgspec

from shared.mesh.consul import LogTarget
from shared.mesh.watch import BlockingWatch

LOGGER = "meshvisor.identity"


class Leaf(msgspec.Struct, frozen=True):
    service: str
    uri: str
    serial: str
    cert_pem: str
    key_pem: str = ""
    valid_before: str = ""

    def __repr__(self) -> str:  # never show key material
        return f"Leaf({self.service} serial={self.serial} valid_before={self.valid_before})"


class Roots(msgspec.Struct, frozen=True):
    trust_domain: str
    ids: tuple[str, ...]
    pems: tuple[str, ...]  # every root and intermediate: all trusted


class LeafWatch(BlockingWatch[Leaf]):
    def __init__(self, client: consul.aio.Consul, service: str, *, on_change: Callable[[Leaf], None] | None = None,
                 log: LogTarget = None) -> None:
        super().__init__(client, wait=300.0, on_change=on_change, log=log, what=f"leaf certificate of {service}",
                         stale=False)
        self.service = service
        self.leaf: Leaf | None = None

    def _path(self) -> str:
        return f"/v1/agent/connect/ca/leaf/{self.service}"

    def _apply(self, data: Any, keep_missing: bool) -> Leaf | None:
        leaf = Leaf(service=data["Service"], uri=data["ServiceURI"], serial=data["SerialNumber"],
                    cert_pem=data["CertPEM"], key_pem=data["PrivateKeyPEM"], valid_before=data.get("ValidBefore", ""))
        if self.leaf is not None and leaf.serial == self.leaf.serial and leaf.cert_pem == self.leaf.cert_pem:
            return None
        self.leaf = leaf
        return leaf

    def _describe_kept(self) -> str:
        return "keeping the last leaf certificate" if self.leaf else "no leaf certificate yet"


class RootsWatch(BlockingWatch[Roots]):
    def __init__(self, client: consul.aio.Consul, *, on_change: Callable[[Roots], None] | None = None,
                 log: LogTarget = None) -> None:
        super().__init__(client, wait=300.0, on_change=on_change, log=log, what="Connect CA roots", stale=False)
        self.roots: Roots | None = None

    def _path(self) -> str:
        return "/v1/agent/connect/ca/roots"

    def _apply(self, data: Any, keep_missing: bool) -> Roots | None:
        pems: list[str] = []
        ids: list[str] = []
        for root in data.get("Roots") or ():
            ids.append(root["ID"])
            pems.append(root["RootCert"])
            pems += root.get("IntermediateCerts") or ()
        if not pems:
            raise ValueError("the agent returned no CA root")
        roots = Roots(trust_domain=data.get("TrustDomain", ""), ids=tuple(ids), pems=tuple(pems))
        if roots == self.roots:
            return None
        self.roots = roots
        return roots

    def _describe_kept(self) -> str:
        return "keeping the last CA roots" if self.roots else "no CA roots yet"


def _load_leaf(context: ssl.SSLContext, leaf: Leaf) -> None:
    """The leaf and its key into `context`, through a memory file (see the module doc)."""
    fd = os.memfd_create("meshvisor-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, (leaf.cert_pem.rstrip("\n") + "\n" + leaf.key_pem).encode())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def make_contexts(leaf: Leaf, roots: Roots) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context): both present `leaf` and require the peer's
    certificate to chain to one of `roots`; neither checks host names (leaves have none)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    bundle = "\n".join(p.rstrip("\n") for p in roots.pems) + "\n"
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=bundle)
        _load_leaf(context, leaf)
    return server, client


def peer_uri(ssl_object: Any) -> str:
    """The URI SAN of the peer's (verified) certificate, or ""."""
    if ssl_object is None:
        return ""
    cert = ssl_object.getpeercert()
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI":
            return value
    return ""


def service_of(uri: str, trust_domain: str) -> str:
    """The service a SPIFFE URI of our trust domain names, or "" for anything else:
    spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<name>."""
    prefix = f"spiffe://{trust_domain}/"
    if not trust_domain or not uri.startswith(prefix):
        return ""
    parts = uri[len(prefix):].split("/")
    if len(parts) != 6 or parts[0] != "ns" or parts[2] != "dc" or parts[4] != "svc" or not parts[5]:
        return ""
    return parts[5]


class Identity:
    """The leaf of `service` and the trust bundle, kept current, as TLS contexts."""

    def __init__(self, client: consul.aio.Consul, service: str, *, log: LogTarget = None) -> None:
        self.service = service
        self.leaf_watch = LeafWatch(client, service, on_change=self._changed, log=log)
        self.roots_watch = RootsWatch(client, on_change=self._changed, log=log)
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self.changes = 0  # contexts built so far (1 at start, +1 per renewal or rotation)
        # The context a listening socket keeps: its SNI callback (run for every handshake,
        # with or without SNI) hands the connection the current server context.
        # The verify mode is the connection's own, copied from this context when the
        # connection is made (switching contexts does not change it); the certificates it
        # is checked against are the current context's.
        self.front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.front.minimum_version = ssl.TLSVersion.TLSv1_2
        self.front.verify_mode = ssl.CERT_REQUIRED
        self.front.sni_callback = self._pick_server_context

    async def start(self, timeout: float = 30.0) -> None:
        """Follow leaf and roots; returns once both are in hand (TimeoutError if not)."""
        await self.leaf_watch.start()
        await self.roots_watch.start()
        ready = await asyncio.gather(self.leaf_watch.wait_ready(timeout), self.roots_watch.wait_ready(timeout))
        if not all(ready) or self._server is None:
            await self.stop()
            raise TimeoutError(f"no Connect identity for {self.service} within {timeout:g}s: {self.problem}")

    async def stop(self) -> None:
        await self.leaf_watch.stop()
        await self.roots_watch.stop()

    @property
    def trust_domain(self) -> str:
        roots = self.roots_watch.roots
        return roots.trust_domain if roots is not None else ""

    @property
    def uri(self) -> str:
        leaf = self.leaf_watch.leaf
        return leaf.uri if leaf is not None else ""

    @property
    def problem(self) -> str:
        """What keeps the identity from being current, or "" (for status and logs)."""
        problems = [w.problem for w in (self.leaf_watch, self.roots_watch) if w.problem]
        return "; ".join(problems)

    def client_context(self) -> ssl.SSLContext:
        assert self._client is not None, "Identity.start() first"
        return self._client

    def peer_service(self, ssl_object: Any) -> str:
        """The service named by the verified peer certificate of a connection, or ""."""
        return service_of(peer_uri(ssl_object), self.trust_domain)

    def _changed(self, _value: object) -> None:
        leaf, roots = self.leaf_watch.leaf, self.roots_watch.roots
        if leaf is None or roots is None:
            return
        self._server, self._client = make_contexts(leaf, roots)
        self.changes += 1

    def _pick_server_context(self, ssl_object: ssl.SSLObject, server_name: str | None,
                             front: ssl.SSLContext) -> None:
        if self._server is not None:
            ssl_object.context = self._server
