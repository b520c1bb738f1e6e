"""The sidecar's settings, from the environment the supervisor gives it.

One table: each field names its variable (shared.mesh.envstruct), from which the sidecar
reads them (`from_env`), the supervisor writes them (`to_env`, supervisor/instance.py)
and the supervisor's config refuses a `sidecar_env` naming one it sets
(`env_names(supervisor=True)`, supervisor/config.py).

Run by hand with the same variables, e.g.:
  SERVICE_NAME=auth INSTANCE_INDEX=1 SIDECAR_PORT=21001 APP_PORT=21000 \
  SIDECAR_ADMIN_PORT=21002 SIDECAR_UPSTREAMS=billing=21003 python -m sidecar
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from shared.mesh.envstruct import InstanceSettings, SettingsError, Var

__all__ = ["SettingsError", "SidecarSettings"]


def _parse_upstreams(text: str) -> dict[str, int]:
    upstreams: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, _, port = item.partition("=")
        if not name or not port.isdigit():
            raise ValueError(f"item {item!r} is not NAME=PORT")
        upstreams[name] = int(port)
    return upstreams


def _format_upstreams(upstreams: dict[str, int]) -> str:
    return ",".join(f"{name}={port}" for name, port in upstreams.items())


class SidecarSettings(InstanceSettings, kw_only=True):
    """service, index, service_id, node, consul_address, consul_token: InstanceSettings."""

    component: ClassVar[str] = "sidecar"

    # Where the public listener binds and what Consul advertises ([supervisor] advertise).
    host: Annotated[str, Var("SIDECAR_HOST", supervisor=True)] = "127.0.0.1"
    port: Annotated[int, Var("SIDECAR_PORT", supervisor=True)]  # public listener (what Consul registers)
    app_port: Annotated[int, Var("APP_PORT", supervisor=True)]  # the app, on 127.0.0.1
    # And on this Unix socket path, if not "" (the service's app_socket).
    app_socket: Annotated[str, Var("APP_SOCKET", supervisor=True)] = ""
    admin_port: Annotated[int, Var("SIDECAR_ADMIN_PORT", supervisor=True)] = 0  # /metrics, /ready, /status
    health: Annotated[str, Var("HEALTH_PATH", supervisor=True)] = "/health"
    route: Annotated[str, Var("SERVICE_ROUTE", supervisor=True)] = ""
    openapi: Annotated[str, Var("OPENAPI_PATH", supervisor=True)] = ""
    version: Annotated[str, Var("SERVICE_VERSION", supervisor=True)] = "0"
    # The app answers a repeated Idempotency-Key with the first outcome on every
    # non-idempotent operation: relays may then resend keyed requests (Meta idempotency_key).
    idempotency_key: Annotated[bool, Var("SERVICE_IDEMPOTENCY_KEY", supervisor=True)] = False
    # name -> local listener port
    upstreams: Annotated[dict[str, int], Var("SIDECAR_UPSTREAMS", supervisor=True, parse=_parse_upstreams,
                                             format=_format_upstreams)] = {}
    reuse_port: Annotated[bool, Var("SIDECAR_REUSE_PORT", supervisor=True)] = False
    drain_seconds: Annotated[float, Var("SIDECAR_DRAIN_SECONDS", supervisor=True)] = 2.0
    check_interval: Annotated[str, Var("SIDECAR_CHECK_INTERVAL")] = "2s"
    check_timeout: Annotated[str, Var("SIDECAR_CHECK_TIMEOUT")] = "1s"
    deregister_after: Annotated[str, Var("SIDECAR_DEREGISTER_AFTER")] = "1m"
    connect_timeout: Annotated[float, Var("SIDECAR_CONNECT_TIMEOUT")] = 2.0
    request_timeout: Annotated[float, Var("SIDECAR_REQUEST_TIMEOUT")] = 30.0
    # A request head must be whole within this many seconds (else 408 and close).
    header_timeout: Annotated[float, Var("SIDECAR_HEADER_TIMEOUT")] = 10.0
    retries: Annotated[int, Var("SIDECAR_RETRIES")] = 2
    access_log: Annotated[bool, Var("SIDECAR_ACCESS_LOG")] = True
    # Also listen on an abstract Unix socket and announce it, for gateways and sidecars on
    # this host (shared.mesh.local).
    unix_socket: Annotated[bool, Var("SIDECAR_UNIX_SOCKET")] = True
    # Where the app serves its Prometheus metrics (announced for Prometheus to scrape it on
    # 127.0.0.1:APP_PORT); "" when it serves none.
    app_metrics: Annotated[str, Var("SIDECAR_APP_METRICS")] = "/metrics"
