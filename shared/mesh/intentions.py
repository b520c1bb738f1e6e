"""Connect intentions, written and read through Consul 1.8's API: who may call whom.

Consul 1.8.7 has `POST /v1/connect/intentions` (create), `PUT|DELETE
/v1/connect/intentions/<id>` and the list; it has no `/intentions/exact` (py-consul
1.8.0's helpers call it, so they are not used). `upsert` finds the intention of a
source/destination pair in the list and updates it, or creates it: one intention per pair,
as Consul requires. `*` is the wildcard; an exact name wins over it.
"""

from __future__ import annotations

import consul.aio
import msgspec

from shared.mesh.consul import call

ACTIONS = ("allow", "deny")


class Intention(msgspec.Struct, frozen=True):
    source: str
    destination: str
    action: str
    id: str = ""
    description: str = ""


async def list_intentions(client: consul.aio.Consul) -> list[Intention]:
    reply = (await call(client, "GET", "/v1/connect/intentions")).raise_for_status()
    found = [Intention(source=i["SourceName"], destination=i["DestinationName"], action=i["Action"],
                       id=i["ID"], description=i.get("Description", "")) for i in reply.json() or ()]
    return sorted(found, key=lambda i: (i.destination == "*", i.destination, i.source == "*", i.source))


async def upsert(client: consul.aio.Consul, source: str, destination: str, action: str,
                 description: str = "") -> tuple[Intention, bool]:
    """Make `source -> destination` say `action`; returns it and whether anything changed."""
    if action not in ACTIONS:
        raise ValueError(f"an intention's action is one of {', '.join(ACTIONS)}, not {action!r}")
    for name in (source, destination):
        if not name or "/" in name:
            raise ValueError(f"{name!r} is not a service name or *")
    body = {"SourceName": source, "DestinationName": destination, "SourceType": "consul", "Action": action,
            "Description": description}
    for existing in await list_intentions(client):
        if (existing.source, existing.destination) == (source, destination):
            if existing.action == action:
                return existing, False
            (await call(client, "PUT", f"/v1/connect/intentions/{existing.id}", payload=body)).raise_for_status()
            return msgspec.structs.replace(existing, action=action), True
    reply = (await call(client, "POST", "/v1/connect/intentions", payload=body)).raise_for_status()
    return Intention(source=source, destination=destination, action=action, id=reply.json()["ID"],
                     description=description), True
