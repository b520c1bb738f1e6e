"""Names every process of the mesh agrees on: the Consul node name and the service ID of an instance."""

from __future__ import annotations

import socket


def node_name(configured: str = "") -> str:
    """The Consul node name: the configured one, else the host name."""
    return configured or socket.gethostname()


def service_id(service: str, node: str, index: int, generation: int = 1) -> str:
    """Unique per host and instance; a replacement during a rolling restart runs beside
    the old one for a moment, so it gets its own ID (-r2, -r3, ...)."""
    return f"{service}-{node}-{index}" + (f"-r{generation}" if generation > 1 else "")
