"""Consul ACLs for the embedded agent: who may register, fetch certificates, write intentions.

The embedded agent runs with `default_policy = "deny"`. The supervisor holds the
management token (generated on first start, given to the agent as `acl.tokens.master` in
its config file, kept in `<state>/secrets/`, mode 0600) and on every start makes sure that:

- an agent token exists (node:write, service:read) and the agent uses it;
- the anonymous token may read services and nodes only: the Consul UI and `curl` show
  discovery without a login, while registering, fetching a leaf certificate and writing
  intentions need a token;
- every service has a token of its own, with a ServiceIdentity (write on the service and
  `<name>-sidecar-proxy`, read on every service and node: discovery and intentions), which
  the supervisor hands to that service's processes in the environment, never on a command
  line and never in a log.

With an external Consul the agent and the anonymous token are its operators' business:
only the services' tokens are made, with `[consul] token` (which needs acl = "write").

Tokens are kept (accessor and secret) in `<state>/secrets/tokens.json` (0600). If Consul
lost them (its data dir was removed), they are created again with the same IDs, so
processes that hold one keep working. Everything here is idempotent: a restart of the
supervisor or of the agent changes nothing that is already right.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import consul.aio

from shared.mesh.consul import call

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
AGENT_POLICY = "meshvisor-agent"
ANONYMOUS_POLICY = "meshvisor-anonymous"
POLICIES = {
    AGENT_POLICY: 'node_prefix "" { policy = "write" }\nservice_prefix "" { policy = "read" }\n',
    ANONYMOUS_POLICY: 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }\n',
}


class Secrets:
    """The state dir's secrets: a 0700 folder of 0600 files, written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "secrets"

    def _prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _write(self, name: str, text: str) -> None:
        self._prepare()
        tmp = self.dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, self.dir / name)

    def management_token(self) -> str:
        """The management token, made on first use."""
        path = self.dir / "consul-management-token"
        if path.exists():
            return path.read_text().strip()
        token = str(uuid.uuid4())
        self._write(path.name, token + "\n")
        return token

    def has_management_token(self) -> bool:
        return (self.dir / "consul-management-token").exists()

    def tokens(self) -> dict[str, dict[str, str]]:
        path = self.dir / "tokens.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_tokens(self, tokens: dict[str, dict[str, str]]) -> None:
        self._write("tokens.json", json.dumps(tokens, indent=1, sort_keys=True) + "\n")


async def _ensure_policy(client: consul.aio.Consul, name: str, rules: str, existing: dict[str, str]) -> None:
    body = {"Name": name, "Rules": rules, "Description": "meshvisor (made by the supervisor)"}
    if name not in existing:
        (await call(client, "PUT", "/v1/acl/policy", payload=body)).raise_for_status()
        return
    current = (await call(client, "GET", f"/v1/acl/policy/{existing[name]}")).raise_for_status().json()
    if current.get("Rules") != rules:
        (await call(client, "PUT", f"/v1/acl/policy/{existing[name]}", payload=body)).raise_for_status()


async def _ensure_token(client: consul.aio.Consul, kept: dict[str, str] | None, body: dict) -> dict[str, str]:
    """The token `kept` describes if Consul still has it, else made anew (same IDs if known)."""
    if kept:
        reply = await call(client, "GET", f"/v1/acl/token/{kept['AccessorID']}")
        if reply.ok:
            token = reply.json()
            wanted = {k: body[k] for k in ("Policies", "ServiceIdentities") if k in body}
            have = {k: [{f: v for f, v in item.items() if f in ("Name", "ServiceName")} for item in token.get(k) or ()]
                    for k in wanted}
            if have != wanted:
                (await call(client, "PUT", f"/v1/acl/token/{kept['AccessorID']}",
                            payload={**body, "SecretID": kept["SecretID"]})).raise_for_status()
            return kept
        if reply.status != 403 and reply.status != 404:
            reply.raise_for_status()
        body = {**body, "AccessorID": kept["AccessorID"], "SecretID": kept["SecretID"]}
    token = (await call(client, "PUT", "/v1/acl/token", payload=body)).raise_for_status().json()
    return {"AccessorID": token["AccessorID"], "SecretID": token["SecretID"]}


async def bootstrap(client: consul.aio.Consul, services: list[str], secrets: Secrets, *,
                    agent: bool = True) -> dict[str, str]:
    """Tokens of the services (see the module doc) and, with `agent` (the embedded agent,
    which the supervisor owns), the policies, the agent's token and the anonymous token's
    rights; `client` carries a token allowed to write ACLs. Returns {service: secret}."""
    if agent:
        listed = (await call(client, "GET", "/v1/acl/policies")).raise_for_status().json()
        existing = {p["Name"]: p["ID"] for p in listed}
        for name, rules in POLICIES.items():
            await _ensure_policy(client, name, rules, existing)
    kept = secrets.tokens()
    wanted: dict[str, dict] = {}
    if agent:
        wanted["agent"] = {"Description": "meshvisor: the Consul agent", "Policies": [{"Name": AGENT_POLICY}]}
    for name in services:
        wanted[f"service:{name}"] = {"Description": f"meshvisor: service {name}",
                                     "ServiceIdentities": [{"ServiceName": name}]}
    tokens = {key: await _ensure_token(client, kept.get(key), body) for key, body in wanted.items()}
    tokens.update({key: value for key, value in kept.items() if key not in tokens})  # a removed service's, kept
    if tokens != kept:
        secrets.save_tokens(tokens)
    if agent:
        (await call(client, "PUT", "/v1/agent/token/agent", payload={"Token": tokens["agent"]["SecretID"]})
         ).raise_for_status()
        anonymous = {"Description": "Anonymous: reads services and nodes (meshvisor)",
                     "Policies": [{"Name": ANONYMOUS_POLICY}]}
        (await call(client, "PUT", f"/v1/acl/token/{ANONYMOUS_ACCESSOR}", payload=anonymous)).raise_for_status()
    return {name: tokens[f"service:{name}"]["SecretID"] for name in services}
