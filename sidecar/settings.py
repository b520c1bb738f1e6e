"""The sidecar's settings, from the environment the supervisor gives it.

Run by hand with the same variables, e.g.:
  SERVICE_NAME=auth INSTANCE_INDEX=1 SIDECAR_PORT=21001 APP_PORT=21000 \
  SIDECAR_ADMIN_PORT=21002 SIDECAR_UPSTREAMS=billing=21003 python -m sidecar
"""

from __future__ import annotations

import os
import socket

import msgspec


class SidecarSettings(msgspec.Struct, kw_only=True):
    service: str
    index: int
    service_id: str
    host: str  # where the public listener binds and what Consul advertises
    port: int  # public listener (what Consul registers)
    app_port: int  # the app, on 127.0.0.1
    app_socket: str  # and on this Unix socket path, if not "" (the service's app_socket)
    admin_port: int  # /metrics, /ready, /status
    health: str
    route: str
    openapi: str
    version: str
    # The app answers a repeated Idempotency-Key with the first outcome on every
    # non-idempotent operation: relays may then resend keyed requests (Meta idempotency_key).
    idempotency_key: bool = False
    upstreams: dict[str, int]  # name -> local listener port
    consul_address: str
    consul_token: str
    reuse_port: bool
    drain_seconds: float
    check_interval: str
    check_timeout: str
    deregister_after: str
    connect_timeout: float
    request_timeout: float
    retries: int
    access_log: bool
    # Also listen on an abstract Unix socket and announce it, for gateways and sidecars on
    # this host (shared.mesh.local).
    unix_socket: bool = True

    @property
    def instance(self) -> str:
        return f"{self.service}.{self.index}"


class SettingsError(Exception):
    pass


def from_env(env: dict[str, str] | None = None) -> SidecarSettings:
    env = os.environ if env is None else env

    def need(name: str) -> str:
        value = env.get(name)
        if not value:
            raise SettingsError(f"sidecar: environment variable {name} is required")
        return value

    def number(name: str, default: str, kind=int):
        text = env.get(name, default)
        try:
            return kind(text)
        except ValueError:
            raise SettingsError(f"sidecar: {name}={text!r} is not a number") from None

    service = need("SERVICE_NAME")
    index = number("INSTANCE_INDEX", "1")
    upstreams: dict[str, int] = {}
    for item in filter(None, env.get("SIDECAR_UPSTREAMS", "").split(",")):
        name, _, port = item.partition("=")
        if not name or not port.isdigit():
            raise SettingsError(f"sidecar: SIDECAR_UPSTREAMS item {item!r} is not NAME=PORT")
        upstreams[name] = int(port)
    node = env.get("CONSUL_NODE") or socket.gethostname()
    return SidecarSettings(
        service=service,
        index=index,
        service_id=env.get("SERVICE_ID") or f"{service}-{node}-{index}",
        host=env.get("SIDECAR_HOST", "127.0.0.1"),
        port=int(need("SIDECAR_PORT")),
        app_port=int(need("APP_PORT")),
        app_socket=env.get("APP_SOCKET", ""),
        admin_port=number("SIDECAR_ADMIN_PORT", "0"),
        health=env.get("HEALTH_PATH", "/health"),
        route=env.get("SERVICE_ROUTE", ""),
        openapi=env.get("OPENAPI_PATH", ""),
        version=env.get("SERVICE_VERSION", "0"),
        idempotency_key=env.get("SERVICE_IDEMPOTENCY_KEY", "") == "1",
        upstreams=upstreams,
        consul_address=env.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
        consul_token=env.get("CONSUL_HTTP_TOKEN", ""),
        reuse_port=env.get("SIDECAR_REUSE_PORT", "") == "1",
        drain_seconds=number("SIDECAR_DRAIN_SECONDS", "2", float),
        check_interval=env.get("SIDECAR_CHECK_INTERVAL", "2s"),
        check_timeout=env.get("SIDECAR_CHECK_TIMEOUT", "1s"),
        deregister_after=env.get("SIDECAR_DEREGISTER_AFTER", "1m"),
        connect_timeout=number("SIDECAR_CONNECT_TIMEOUT", "2", float),
        request_timeout=number("SIDECAR_REQUEST_TIMEOUT", "30", float),
        retries=number("SIDECAR_RETRIES", "2"),
        access_log=env.get("SIDECAR_ACCESS_LOG", "1") != "0",
        unix_socket=env.get("SIDECAR_UNIX_SOCKET", "1") != "0",
    )
