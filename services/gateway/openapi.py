"""One OpenAPI document merged from every routed service's own.

Each service's document is fetched from one of its passing instances (the path is the
`openapi` entry of its Consul Meta), when the set of routes changes and at most every
`max_age` seconds otherwise. A service whose document cannot be fetched keeps its last
good one. Schema names that two services both use are prefixed with the service name.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time

import aiohttp

from services.gateway.routes import RouteTable
from shared.mesh.meta import InstanceMeta
from shared.mesh.mtls import Outbound

log = logging.getLogger("meshvisor.gateway.openapi")
FETCH_TIMEOUT = 3.0  # seconds for one service's document


class OpenApiMerger:
    def __init__(self, table: RouteTable, title: str = "meshvisor API", max_age: float = 30.0,
                 tls: Outbound | None = None) -> None:
        self.table = table
        self.tls = tls  # with mTLS: fetched over it, from an instance that proves its service
        self.title = title
        self.max_age = max_age
        self._docs: dict[str, dict] = {}  # service -> its last good document
        self._merged: dict | None = None
        self._built_at = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._merged = None

    async def document(self) -> dict:
        async with self._lock:
            if self._merged is None or time.monotonic() - self._built_at > self.max_age:
                await self._refresh()
                routed = self.table.routed()
                self._merged = merge(self.title, {
                    name: (self.table.prefixes.get(name, ""), doc) for name, doc in self._docs.items()
                    if name in routed
                })
                self._built_at = time.monotonic()
            return self._merged

    async def _refresh(self) -> None:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._fetch(session, name) for name in self.table.routed()))

    async def _fetch(self, session: aiohttp.ClientSession, service: str) -> None:
        for endpoint in self.table.endpoints.get(service, ()):
            path = InstanceMeta.from_meta(endpoint.meta).openapi
            if not path:
                return
            try:
                status, body = await self._get(session, service, endpoint.address, endpoint.port, path)
                if status == 200:
                    doc = json.loads(body)
                    if isinstance(doc, dict) and isinstance(doc.get("paths"), dict):
                        self._docs[service] = doc
                        return
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("openapi of %s from %s:%s failed: %s", service, endpoint.address, endpoint.port,
                            type(exc).__name__)


    async def _get(self, session: aiohttp.ClientSession, service: str, host: str, port: int,
                   path: str) -> tuple[int, bytes]:
        if self.tls is not None:  # mTLS to an instance that proves to be of `service`
            return await self.tls.get(host, port, service, path, FETCH_TIMEOUT)
        async with session.get(f"http://{host}:{port}{path}") as resp:
            return resp.status, await resp.read()


def merge(title: str, services: dict[str, tuple[str, dict]]) -> dict:
    """services: name -> (route prefix, its document). Paths are kept as the service
    wrote them when they already start with its prefix, else put under the prefix."""
    merged: dict = {
        "openapi": "3.0.3",
        "info": {"title": title, "version": "1", "description": "Every service behind the gateway."},
        "paths": {},
        "components": {"schemas": {}},
        "tags": [],
    }
    owners: dict[str, str] = {}
    for name in sorted(services):
        prefix, original = services[name]
        doc = copy.deepcopy(original)
        if str(doc.get("openapi", "")).startswith("3.1"):
            merged["openapi"] = "3.1.0"
        components = doc.get("components", {}) or {}
        renames = {}
        for schema, body in (components.get("schemas") or {}).items():
            if schema in merged["components"]["schemas"] and merged["components"]["schemas"][schema] != body:
                renames[schema] = f"{name}_{schema}"
        if renames:
            doc = _rename_refs(doc, renames)
            components = doc.get("components", {}) or {}
        for kind, entries in components.items():
            target = merged["components"].setdefault(kind, {})
            for key, body in (entries or {}).items():
                target[renames.get(key, key) if kind == "schemas" else key] = body
        merged["tags"].append({"name": name, "description": (doc.get("info") or {}).get("title", name)})
        for path, item in (doc.get("paths") or {}).items():
            full = path if not prefix or path == prefix or path.startswith(prefix + "/") else prefix + path
            if full in owners:
                log.warning("path %s of %s is already documented by %s; skipped", full, name, owners[full])
                continue
            owners[full] = name
            for operation in item.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation.setdefault("tags", [name])
            merged["paths"][full] = item
    return merged


def _rename_refs(node, renames: dict[str, str]):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/components/schemas/"):
                old = value.rsplit("/", 1)[1]
                out[key] = f"#/components/schemas/{renames.get(old, old)}"
            elif key == "schemas" and isinstance(value, dict):
                out[key] = {renames.get(k, k): _rename_refs(v, renames) for k, v in value.items()}
            else:
                out[key] = _rename_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rename_refs(item, renames) for item in node]
    return node
