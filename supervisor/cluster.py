"""The whole cluster as Consul sees it, for `supervisor status --cluster`.

`supervisor status` shows what this supervisor runs; on several hosts each supervisor
knows its own host only. Consul knows them all: the gossip pool (`/v1/agent/members`)
has every agent with its role and serf status, the catalog and health endpoints every
instance registered on any host, with its checks. So this picture is read from Consul,
through the local agent, never from a supervisor's memory, with the supervisor's own
token (node:read and service:read; `/v1/agent/self` needs agent:read, without which no
node is marked as this host).

Reads are `stale`: any server answers, so the picture still shows while the cluster has
no leader (and says so). A part that cannot be read becomes a problem line and the rest
is still shown; a node with no `serfHealth` check shows `unknown`. Only an agent that
does not answer at all is an error (`Unreachable`): one line, no picture.

An instance's status is the worst of its own checks and its node's (`serfHealth`), as
Consul's `?passing` filter has it: an instance on a dead host is critical here, although
its own check, run by the dead agent, last said passing.

`read` gives a `Picture` (plain Structs: JSON for `--json` and over the control API);
`render` turns one into the terminal's text and is a pure function.
"""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec

from shared.mesh.consul import call, describe, make_client

# Consul's member status numbers (hashicorp/serf's MemberStatus).
SERF_STATUS = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}
# Worst last: an instance is as healthy as its worst check.
CHECK_ORDER = ("passing", "warning", "critical")
NODE_CHECK = "serfHealth"
LOCAL_MARK = "*"


class Node(msgspec.Struct):
    name: str
    address: str
    role: str  # "server", "client", or "" for a node only the catalog knows
    serf: str  # alive, leaving, left, failed; "" when not in the gossip pool
    health: str  # its serfHealth check: passing, critical, ..., or "unknown"
    local: bool = False  # the node of the agent this picture was read through


class Instance(msgspec.Struct):
    id: str
    node: str
    address: str
    port: int
    status: str  # worst of its checks and its node's


class Picture(msgspec.Struct):
    datacenter: str
    leader: str  # "" when the cluster has none
    local_node: str  # "" when the token may not read /v1/agent/self
    nodes: list[Node]
    services: dict[str, list[Instance]]  # every service but `consul`, by name
    problems: list[str] = []


class Unreachable(ConnectionError):
    """The local Consul agent does not answer (a ConnectionError, so that the control
    server can answer 503 without importing this module and py-consul with it)."""


# -- what Consul answers (only the fields read here; the rest is ignored) ---------------


class _SelfConfig(msgspec.Struct, rename="pascal"):
    datacenter: str = ""
    node_name: str = ""


class _Self(msgspec.Struct, rename="pascal"):
    config: _SelfConfig


class _Member(msgspec.Struct, rename="pascal"):
    name: str
    addr: str = ""
    tags: dict[str, str] | None = None
    status: int = 0


class _CatalogNode(msgspec.Struct, rename="pascal"):
    node: str
    address: str = ""


class _Check(msgspec.Struct, rename={"check_id": "CheckID", "service_id": "ServiceID", "node": "Node",
                                     "status": "Status"}):
    node: str
    check_id: str = ""
    service_id: str = ""
    status: str = ""


class _EntryService(msgspec.Struct, rename={"id": "ID", "address": "Address", "port": "Port"}):
    id: str
    address: str = ""
    port: int = 0


class _Entry(msgspec.Struct, rename="pascal"):
    node: _CatalogNode
    service: _EntryService
    checks: list[_Check] | None = None


# -- reading ------------------------------------------------------------------------------


async def read(address: str, token: str = "", timeout: float = 5.0) -> Picture:
    """The cluster seen through the agent at `address`; `Unreachable` if it does not answer."""
    try:
        client = make_client(address, token)
    except ValueError as exc:
        raise Unreachable(str(exc)) from None
    try:
        return await _Reader(client, timeout).picture()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise Unreachable(f"cannot reach the Consul agent at {address}: {describe(exc)}") from None
    finally:
        await client.close()


class _Reader:
    def __init__(self, client, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.problems: list[str] = []

    async def get(self, path: str, kind, what: str, stale: bool = True, forbidden_ok: bool = False):
        """The decoded answer, or None with a problem noted (connection failures raise)."""
        params = [("stale", "1")] if stale else []
        reply = await call(self.client, "GET", path, params=params, timeout=self.timeout)
        if reply.status == 403 and forbidden_ok:
            return None
        if not reply.ok:
            self.problems.append(f"{what}: {reply.status} {reply.body.strip()[:200]}")
            return None
        try:
            return msgspec.json.decode(reply.body, type=kind)
        except msgspec.DecodeError as exc:  # ValidationError included
            self.problems.append(f"{what}: unexpected answer ({exc})")
            return None

    async def picture(self) -> Picture:
        # The agent's own endpoints first: if it does not answer, that is the whole story.
        # Without agent:read (403) no node is marked as this host, and that is all.
        me = await self.get("/v1/agent/self", _Self, "this agent", stale=False, forbidden_ok=True)
        members, leader, peers, catalog_nodes, checks, names = await asyncio.gather(
            self.get("/v1/agent/members", list[_Member], "gossip members", stale=False),
            self.get("/v1/status/leader", str, "leader", stale=False),
            self.get("/v1/status/peers", list[str], "Raft peers", stale=False),
            self.get("/v1/catalog/nodes", list[_CatalogNode], "catalog nodes"),
            self.get("/v1/health/state/any", list[_Check], "checks"),
            self.get("/v1/catalog/services", dict[str, list[str] | None], "catalog services"),
        )
        services = sorted(name for name in (names or {}) if name != "consul")
        entries = await asyncio.gather(*(
            self.get(f"/v1/health/service/{name}", list[_Entry], f"service {name}") for name in services))
        local = me.config.node_name if me else ""
        nodes = _nodes(members or [], catalog_nodes or [], checks, local)
        self.problems += _raft_problems(members, leader, peers)
        return Picture(
            datacenter=me.config.datacenter if me else "",
            leader=leader or "",
            local_node=local,
            nodes=nodes,
            services={name: _instances(found) for name, found in zip(services, entries) if found is not None},
            problems=self.problems,
        )


def _nodes(members: list[_Member], catalog: list[_CatalogNode], checks: list[_Check] | None,
           local: str) -> list[Node]:
    """Every agent in the gossip pool and every node in the catalog (a failed agent is in
    both; one that left only in the pool, until it is reaped; one registered through the
    catalog API only in the catalog)."""
    health = {c.node: c.status for c in checks or () if c.check_id == NODE_CHECK and not c.service_id}
    addresses = {n.node: n.address for n in catalog}
    found = {}
    for m in members:
        role = "server" if (m.tags or {}).get("role") == "consul" else "client"
        found[m.name] = Node(m.name, addresses.get(m.name) or m.addr, role, SERF_STATUS.get(m.status, str(m.status)),
                             health.get(m.name, "unknown"), m.name == local)
    for name, address in addresses.items():
        if name not in found:
            found[name] = Node(name, address, "", "", health.get(name, "unknown"), name == local)
    return sorted(found.values(), key=lambda n: (n.role != "server", n.name))


def _instances(entries: list[_Entry]) -> list[Instance]:
    return sorted(
        (Instance(e.service.id, e.node.node, e.service.address or e.node.address, e.service.port,
                  worst(c.status for c in e.checks or ()))
         for e in entries),
        key=lambda i: (i.node, i.id),
    )


def worst(statuses) -> str:
    """The worst of some check statuses; no check at all is passing (Consul's rule), and a
    status this code does not know counts as critical."""
    rank = 0
    for status in statuses:
        rank = max(rank, CHECK_ORDER.index(status) if status in CHECK_ORDER else len(CHECK_ORDER) - 1)
    return CHECK_ORDER[rank]


def _raft_problems(members: list[_Member] | None, leader: str | None, peers: list[str] | None) -> list[str]:
    problems = []
    if leader == "":
        problems.append("the cluster has no leader: the catalog shown may be out of date")
    if members is not None and peers is not None:
        servers = [m.name for m in members if (m.tags or {}).get("role") == "consul" and m.status == 1]
        if len(servers) > len(peers):
            problems.append(
                f"{len(servers)} servers are alive in the gossip pool but the Raft peer set has "
                f"{len(peers)}: a server still joining, or servers bootstrapped apart (split brain)")
    return problems


# -- rendering ----------------------------------------------------------------------------


def summary(instances: list[Instance]) -> str:
    """'3 passing on 3 nodes', '2 passing, 1 critical on 2 nodes'."""
    if not instances:
        return "no instances"
    counts = [f"{n} {status}" for status in CHECK_ORDER
              if (n := sum(1 for i in instances if i.status == status))]
    return f"{', '.join(counts)} on {_count(len({i.node for i in instances}), 'node')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]


def render(picture: Picture) -> str:
    """The picture as the terminal shows it: the nodes, then every service by node."""
    servers = sum(1 for n in picture.nodes if n.role == "server")
    head = (f"Consul cluster{f' {picture.datacenter}' if picture.datacenter else ''}: "
            f"{_count(len(picture.nodes), 'node')} ({_count(servers, 'server')}), leader {picture.leader or 'none'}")
    marked = any(n.local for n in picture.nodes)
    lines = [head + (f"; {LOCAL_MARK} = this host" if marked else ""), ""]
    rows = [[n.name, n.address or "-", n.role or "-", n.serf or "-", n.health] for n in picture.nodes]
    header = ["NODE", "ADDRESS", "ROLE", "SERF", "HEALTH"]
    if marked:
        header, rows = ["", *header], [[LOCAL_MARK if n.local else "", *r] for n, r in zip(picture.nodes, rows)]
    lines += _table(header, rows)
    if not picture.services:
        lines += ["", "no services registered"]
    for name, instances in picture.services.items():
        lines += ["", f"{name}: {summary(instances)}"]
        rows = [[i.node, i.id, f"{i.address}:{i.port}", i.status] for i in instances]
        if rows:
            lines += _table(["NODE", "INSTANCE", "ADDRESS", "STATUS"], rows, indent="  ")
    lines += [f"problem: {p}" for p in picture.problems]
    return "\n".join(lines) + "\n"
