"""What an instance announces about itself in its Consul Meta: one Struct, its field names the keys.

The sidecar writes it for its instance and the gateway for itself (`to_meta()`); the
gateway's route table and OpenAPI merger, discovery's Idempotency-Key rule and the
choice of a Unix socket (shared.mesh.local) read it (`from_meta()`), and Prometheus's
Consul discovery reads the metrics ports (supervisor/infra/prometheus.py).

Consul Meta maps strings to strings. A value at its default is left out (an instance
without a route has no `route` key), a bool is "true" when set. Reading is lenient,
since instances of another version may announce more or less: an unknown key is
ignored and a value that does not read as its type is taken as the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


class InstanceMeta(msgspec.Struct, kw_only=True, frozen=True):
    instance: int = 0  # the instance's index: 2 for auth.2
    role: str = ""  # "gateway" for a gateway; "" for an instance of a service
    version: str = ""  # the service's version from its config
    health: str = ""  # the app's health path
    route: str = ""  # the path prefix the gateway routes to this service
    openapi: str = ""  # where the app serves its OpenAPI document, merged by the gateway
    # Answers a repeated Idempotency-Key with the first outcome: keyed requests may be resent.
    idempotency_key: bool = False
    # "@<name>": also reachable on this abstract socket, "@" standing for the leading NUL
    # (shared.mesh.local).
    unix_socket: str = ""
    host_id: str = ""  # where it runs: the kernel's boot id and network namespace
    # Where this host's Prometheus scrapes it, on 127.0.0.1 (supervisor/infra/prometheus.py):
    # the sidecar's admin listener or the gateway's own endpoints, and the app itself
    # (at app_metrics_path, "" meaning /metrics; no app_metrics_port: the app has none).
    metrics_port: int = 0
    app_metrics_port: int = 0
    app_metrics_path: str = ""

    def to_meta(self) -> dict[str, str]:
        """The Consul Meta announcing this."""
        meta: dict[str, str] = {}
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                meta[name] = "true" if value is True else str(value)
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> InstanceMeta:
        """What an instance's Consul Meta announces."""
        values: dict[str, Any] = {}
        for name, default in _DEFAULTS.items():
            text = meta.get(name)
            if not isinstance(text, str):
                continue
            if isinstance(default, bool):
                values[name] = text == "true"
            elif isinstance(default, int):
                try:
                    values[name] = int(text)
                except ValueError:
                    pass
            else:
                values[name] = text
        return cls(**values)


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in msgspec.structs.fields(InstanceMeta)}
