"""The gateway's settings, from its environment (the supervisor's, plus `[services.gateway] env`).

One table, as for the sidecar (shared.mesh.envstruct): each field names its variable; a
value that is not a number where one is wanted stops the gateway with one line naming the
variable, not a traceback.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from shared.mesh.envstruct import InstanceSettings, Var


class GatewaySettings(InstanceSettings, kw_only=True):
    """service, index, service_id, node, consul_address, consul_token: InstanceSettings."""

    component: ClassVar[str] = "gateway"

    service: Annotated[str, Var("SERVICE_NAME", supervisor=True)] = "gateway"
    host: Annotated[str, Var("HOST")] = "127.0.0.1"  # bind address; 0.0.0.0 serves other machines
    port: Annotated[int, Var("PORT")] = 3000
    # This host's address for the other hosts ([supervisor] advertise): the gateway also
    # listens there and registers it, when it is not `host` already; "": `host` only.
    advertise: Annotated[str, Var("MESH_ADVERTISE")] = ""
    # The gateway's own endpoints (/health, /metrics, /api-docs) on 127.0.0.1; 0: any free port.
    admin_port: Annotated[int, Var("ADMIN_PORT")] = 0
    reuse_port: Annotated[bool, Var("REUSE_PORT")] = False  # instances share `port`
    register: Annotated[bool, Var("GATEWAY_REGISTER")] = True  # in Consul, as service `service`
    max_body: Annotated[int, Var("GATEWAY_MAX_BODY")] = 10 * 1024 * 1024  # larger bodies get 413
    connect_timeout: Annotated[float, Var("GATEWAY_CONNECT_TIMEOUT")] = 2.0
    request_timeout: Annotated[float, Var("GATEWAY_REQUEST_TIMEOUT")] = 30.0
    # A client's request head must be whole within this many seconds (else 408 and close).
    header_timeout: Annotated[float, Var("GATEWAY_HEADER_TIMEOUT")] = 10.0
    retries: Annotated[int, Var("GATEWAY_RETRIES")] = 2
    access_log: Annotated[bool, Var("GATEWAY_ACCESS_LOG")] = True
    drain_seconds: Annotated[float, Var("GATEWAY_DRAIN_SECONDS")] = 1.0
