"""Consul blocking watches -> live instance sets: the passing instances of a service
(ServiceWatch) and the services in the catalog (CatalogWatch), which the gateway's route
table and the sidecars' upstreams follow. The loop itself, with its rules for outages and
agent restarts, is shared.mesh.watch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import consul.aio
import msgspec

from shared.mesh.consul import LogTarget
from shared.mesh.meta import InstanceMeta
from shared.mesh.watch import BlockingWatch, next_index

if TYPE_CHECKING:
    from shared.mesh.relay import Route

__all__ = ["CatalogWatch", "Endpoint", "ServiceWatch", "endpoints_from_health", "honours_idempotency_key",
           "next_index", "route_to"]


class Endpoint(msgspec.Struct, frozen=True):
    """One passing instance of a service, as Consul's health endpoint reports it."""

    id: str
    service: str
    address: str  # Service.Address, or the node's address when the service gave none
    port: int
    meta: dict[str, str] = msgspec.field(default_factory=dict)


def endpoints_from_health(entries: list[dict[str, Any]]) -> tuple[Endpoint, ...]:
    """/v1/health/service/<name> entries -> endpoints sorted by id."""
    found = []
    for entry in entries or []:
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        if not service.get("ID"):
            continue
        found.append(
            Endpoint(
                id=service["ID"],
                service=service.get("Service", ""),
                address=service.get("Address") or node.get("Address", ""),
                port=int(service.get("Port") or 0),
                meta=dict(service.get("Meta") or {}),
            )
        )
    return tuple(sorted(found, key=lambda e: e.id))


def honours_idempotency_key(endpoints: tuple[Endpoint, ...]) -> bool:
    """Whether every instance says (Meta idempotency_key, set from the service's config)
    that it answers a repeated Idempotency-Key with the first outcome, so a keyed request
    may be resent to another instance. All of them: a retry may land on any."""
    return bool(endpoints) and all(InstanceMeta.from_meta(e.meta).idempotency_key for e in endpoints)


def route_to(route: Route, endpoints: tuple[Endpoint, ...]) -> None:
    """Point `route` (a gateway's or a sidecar upstream's) at these passing instances."""
    route.balancer.update((e.id, e.address, e.port, e.meta) for e in endpoints)
    route.idempotency_key = honours_idempotency_key(endpoints)


class ServiceWatch(BlockingWatch[tuple[Endpoint, ...]]):
    """The passing instances of one service, kept current.

    `endpoints` is the last known set, sorted by id; `on_change(endpoints)` is called when
    it really changes.
    """

    def __init__(
        self,
        client: consul.aio.Consul,
        service: str,
        *,
        wait: float = 30.0,
        on_change: Callable[[tuple[Endpoint, ...]], None] | None = None,
        log: LogTarget = None,
        connect: bool = False,
    ) -> None:
        super().__init__(client, wait=wait, on_change=on_change, log=log, what=f"service {service}")
        self.service = service
        # Only the instances in the Connect mesh (Connect.Native or a connect-proxy), the
        # only ones an mTLS client can reach: /v1/health/connect/<name>.
        self.connect = connect
        self.endpoints: tuple[Endpoint, ...] = ()

    def _path(self) -> str:
        kind = "connect" if self.connect else "service"
        return f"/v1/health/{kind}/{self.service}"  # py-consul quotes the path

    def _params(self) -> list[tuple[str, str]]:
        return [("passing", "true")]

    def _apply(self, data: Any, keep_missing: bool) -> tuple[Endpoint, ...] | None:
        endpoints = endpoints_from_health(data)
        if keep_missing:
            seen = {e.id for e in endpoints}
            kept = [e for e in self.endpoints if e.id not in seen]
            if kept:
                self._log.debug(f"service {self.service}: keeping {[e.id for e in kept]} while the agent rebuilds")
                endpoints = tuple(sorted(endpoints + tuple(kept), key=lambda e: e.id))
        if endpoints == self.endpoints:
            return None
        self.endpoints = endpoints
        self._log.debug(f"service {self.service}: {[e.id for e in endpoints]}")
        return endpoints

    def _describe_kept(self) -> str:
        return f"keeping {len(self.endpoints)} known instance(s) of {self.service}"


class CatalogWatch(BlockingWatch[dict[str, list[str]]]):
    """The services in the catalog (name -> tags), kept current."""

    def __init__(
        self,
        client: consul.aio.Consul,
        *,
        wait: float = 30.0,
        on_change: Callable[[dict[str, list[str]]], None] | None = None,
        log: LogTarget = None,
    ) -> None:
        super().__init__(client, wait=wait, on_change=on_change, log=log, what="catalog services")
        self.services: dict[str, list[str]] = {}

    def _path(self) -> str:
        return "/v1/catalog/services"

    def _apply(self, data: Any, keep_missing: bool) -> dict[str, list[str]] | None:
        services = {name: list(tags or []) for name, tags in (data or {}).items()}
        if keep_missing:
            services = {**self.services, **services}
        if services == self.services:
            return None
        self.services = services
        return dict(services)

    def _describe_kept(self) -> str:
        return f"keeping {len(self.services)} known service(s)"
