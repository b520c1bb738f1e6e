"""`supervisor status --cluster` and `supervisor keygen`, with real processes.

The cluster view is read from a real Consul agent (ACLs on, default deny) by the running
supervisor, with its own token, and follows Consul when the stack changes; one stack
start serves the whole integration test. The renderer is a pure function, checked apart
on a hand-built picture of three nodes, one of them failed (one test agent cannot make
another fail on cue).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest

from supervisor.cluster import Instance, Node, Picture, render, summary
from tests.helpers import PY, Project, free_port, mesh_project, wait_for


def _cli(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "supervisor", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_keygen_prints_a_new_32_byte_key_without_config_or_supervisor(tmp_path):
    first, second = _cli(tmp_path, "keygen"), _cli(tmp_path, "keygen")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert len(base64.b64decode(first.stdout.strip(), validate=True)) == 32
    assert first.stdout != second.stdout


def test_render_three_nodes_one_failed():
    def instance(service: str, node: str, address: str, status: str = "passing") -> Instance:
        return Instance(f"{service}-{node}-1", node, address, 21001, status)

    picture = Picture(
        datacenter="dc1", leader="10.0.0.1:8300", local_node="node-a",
        nodes=[Node("node-a", "10.0.0.1", "server", "alive", "passing", local=True),
               Node("node-b", "10.0.0.2", "client", "alive", "passing"),
               Node("node-c", "10.0.0.3", "client", "failed", "critical")],
        services={"auth": [instance("auth", "node-a", "10.0.0.1"), instance("auth", "node-b", "10.0.0.2"),
                           instance("auth", "node-c", "10.0.0.3", "critical")],
                  "example": [instance("example", "node-b", "10.0.0.2")],
                  "idle": []},
        problems=["something odd"],
    )
    out = render(picture)
    print(out)
    lines = out.splitlines()
    assert lines[0] == "Consul cluster dc1: 3 nodes (1 server), leader 10.0.0.1:8300; * = this host"
    rows = {line.split()[-5]: line.split() for line in lines[3:6]}
    assert rows["node-a"] == ["*", "node-a", "10.0.0.1", "server", "alive", "passing"]
    assert rows["node-b"] == ["node-b", "10.0.0.2", "client", "alive", "passing"]
    assert rows["node-c"] == ["node-c", "10.0.0.3", "client", "failed", "critical"]
    assert "auth: 2 passing, 1 critical on 3 nodes" in lines
    assert ["node-c", "auth-node-c-1", "10.0.0.3:21001", "critical"] in [line.split() for line in lines]
    assert "example: 1 passing on 1 node" in lines
    assert "idle: no instances" in lines
    assert lines[-1] == "problem: something odd"
    assert summary([instance("auth", n, "x") for n in ("a", "b", "c")]) == "3 passing on 3 nodes"


def test_status_cluster_without_a_supervisor_says_so_in_one_line(tmp_path):
    embedded = Project("web: true\n", "[services.web]\nsidecar = false\n")
    external = Project("web: true\n", f'[services.web]\nsidecar = false\n\n[consul]\nmode = "external"\n'
                                      f'address = "127.0.0.1:{free_port()}"\n')
    try:
        proc = embedded.cli("status", "--cluster")
        assert proc.returncode == 3 and "not running" in proc.stderr, proc.stderr
        # An external agent outlives the supervisor: asked directly; here nobody answers.
        proc = external.cli("status", "--cluster")
        assert proc.returncode == 1, proc
        assert proc.stderr.startswith("Error: cannot reach the Consul agent at 127.0.0.1:")
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    finally:
        embedded.cleanup()
        external.cleanup()


@pytest.fixture
def stack(agent):
    p = mesh_project(agent.address, {"api": "instances = 2"}, drain_seconds=0.5)
    yield p
    p.cleanup()


def _rows(out: str, first: str, section: str = "nodes") -> list[list[str]]:
    """The rows starting with `first` of the node table, or of the services below it."""
    nodes, _, services = out.partition("\n\n")[2].partition("\n\n")
    text = nodes if section == "nodes" else services
    return [line.split() for line in text.splitlines() if line.split()[:1] == [first]]


def _cluster_view(p: Project) -> str:
    return p.cli("status", "--cluster", check=True).stdout


def test_status_cluster_shows_consul_s_picture_and_follows_it(agent, stack):
    p, node = stack, f"test-{agent.http}"
    started = time.monotonic()
    p.start()
    print(f"stack up in {time.monotonic() - started:.1f}s")
    # A node only the catalog knows (no agent, so no serfHealth check), with a service.
    agent.put("/v1/catalog/register", {"Node": "elsewhere", "Address": "192.0.2.7",
                                       "Service": {"Service": "legacy", "ID": "legacy-1", "Port": 5432}})
    sidecars = {str(r["port"]) for r in p.rows("api") if r["process"].endswith(".sidecar")}

    out = _cluster_view(p)
    print(out)
    assert _rows(out, "*") == [["*", node, "127.0.0.1", "server", "alive", "passing"]], "this host, marked"
    assert _rows(out, "elsewhere") == [["elsewhere", "192.0.2.7", "-", "-", "unknown"]]
    assert "api: 2 passing on 1 node" in out and "legacy: 1 passing on 1 node" in out
    instances = _rows(out, node, "services")
    assert len(instances) == 2 and all(r[3] == "passing" for r in instances)
    assert {r[2].rpartition(":")[2] for r in instances} == sidecars, "the sidecars' public ports"
    assert not any(line.startswith("consul") for line in out.splitlines()) and "problem" not in out

    data = json.loads(p.cli("status", "--cluster", "--json", check=True).stdout)
    assert [(n["name"], n["role"], n["serf"], n["health"], n["local"]) for n in data["nodes"]] == [
        (node, "server", "alive", "passing", True), ("elsewhere", "", "", "unknown", False)]
    assert sorted(i["id"] for i in data["services"]["api"]) == sorted(s["ID"] for s in agent.passing("api"))
    assert data["datacenter"] == "dc1" and data["local_node"] == node and data["problems"] == []

    p.cli("scale", "api=1", check=True)
    scaled = time.monotonic()
    out = wait_for(lambda: (o := _cluster_view(p)) and "api: 1 passing on 1 node" in o and o, 15, interval=0.2,
                   what="one api instance in the cluster view")
    print(f"shown {time.monotonic() - scaled:.1f}s after scale api=1 returned:\n{out}")
    assert len(_rows(out, node, "services")) == 1

    # The agent away: the supervisor says so in one line.
    agent.terminate()
    proc = p.cli("status", "--cluster")
    print(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"Error: cannot reach the Consul agent at {agent.address}: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    # Back, and the supervisor stopped: the external agent is asked directly.
    agent.start()
    p.cli("stop", check=True)
    out = _cluster_view(p)
    print(f"supervisor stopped, asked of the agent directly:\n{out}")
    assert _rows(out, "*") == [["*", node, "127.0.0.1", "server", "alive", "passing"]]
    assert "api:" not in out and "legacy: 1 passing on 1 node" in out
