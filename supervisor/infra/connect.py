"""The mesh's Connect setup in Consul: tokens for every service and the intentions the
config implies.

On every start, once the agent answers: ACLs bootstrapped (supervisor/infra/acl.py) when
they are on, then the intentions, each written only where that pair has none yet, so
what an operator changed with `supervisor intentions` survives a restart:

- `* -> *` deny: nothing calls anything unless allowed (also without ACLs, where Connect's
  own default would be allow);
- `gateway -> S` allow for every service S that has a route (the gateway is whichever
  configured service has no sidecar and no route: the edge);
- `S -> U` allow for every upstream U a service S declares.
"""

from __future__ import annotations

import consul.aio

from shared.mesh.intentions import list_intentions, upsert
from supervisor.config import Config
from supervisor.infra import acl


def implied_intentions(config: Config) -> list[tuple[str, str, str]]:
    """(source, destination, action) the config implies, the default deny first."""
    wanted = [("*", "*", "deny")]
    edges = [s.name for s in config.services.values() if not s.sidecar and not s.route]
    for service in config.services.values():
        if service.route:
            wanted += [(edge, service.name, "allow") for edge in edges]
        wanted += [(service.name, upstream, "allow") for upstream in service.upstreams]
    return wanted


async def prepare(client: consul.aio.Consul, config: Config) -> tuple[dict[str, str], list[str]]:
    """Tokens ({service: secret}; empty without ACLs) and the intentions written now."""
    tokens: dict[str, str] = {}
    if config.consul.acl:
        tokens = await acl.bootstrap(client, list(config.services), acl.Secrets(config.state_dir),
                                     agent=config.consul.mode == "embedded")
    existing = {(i.source, i.destination) for i in await list_intentions(client)}
    written = []
    for source, destination, action in implied_intentions(config):
        if (source, destination) not in existing:
            await upsert(client, source, destination, action, description="implied by the meshvisor config")
            written.append(f"{source} -> {destination} {action}")
    return tokens, written
