"""Three hosts of one meshvisor cluster on this machine: a supervisor and a Consul agent
per network namespace (tests/netns.py), each with a project folder of its own.

The layout is the README's "Several hosts" example, with the hosts' addresses:

- host 1: a Consul server (bootstrap_expect 1; HTTP API and UI on its address), the
  embedded PostgreSQL listening on its address for the other hosts, the gateway, auth;
- hosts 2 and 3: Consul clients joining host 1, example and auth instances, their
  services' databases at host 1 (`[postgres] mode = "peer"`).

Every host gets the same gossip key and the same ACL management token, in a config file
of mode 0600. Used by tests/test_hosts.py and by `make cluster-demo`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
import uuid
from pathlib import Path

from tests.netns import Host

PY = sys.executable
GATEWAY_PORT = 3000
CONSUL_HTTP = 8500
POSTGRES_PORT = 54329

PROCFILE = f"gateway: {PY} -m services.gateway\nauth: {PY} -m services.auth\nexample: {PY} -m services.example\n"


class ClusterHost:
    """One host: its namespace, its project folder, and its supervisor's CLI."""

    def __init__(self, host: Host, base: Path, config: str, procfile: str) -> None:
        self.host = host
        self.node = f"host{host.index}"
        self.root = base / self.node
        (self.root / "config").mkdir(parents=True)
        os.chmod(self.root, 0o755)  # PostgreSQL (the `postgres` user) enters it
        (self.root / "Procfile").write_text(procfile)
        self.config_path = self.root / "config" / "meshvisor.toml"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds secrets
        with os.fdopen(fd, "w") as file:
            file.write(textwrap.dedent(config))
        self.state_dir = self.root / ".state"

    @property
    def address(self) -> str:
        return self.host.address

    def cli(self, *args: str, timeout: float = 150, check: bool = False) -> subprocess.CompletedProcess:
        done = self.host.run([PY, "-m", "supervisor", "--config", str(self.config_path), *args],
                             capture_output=True, text=True, timeout=timeout, cwd=self.root,
                             env={**os.environ, "NO_COLOR": "1"})
        if check and done.returncode != 0:
            raise AssertionError(f"{self.node}: supervisor {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}\n{done.stderr}\n{self.errors_logged()}")
        return done

    def start_background(self, wait: float = 150) -> subprocess.Popen:
        """`supervisor start --detach --wait`, not waited for here (a host that waits for
        the cluster's servers)."""
        return self.host.popen([PY, "-m", "supervisor", "--config", str(self.config_path), "start", "--detach",
                                "--wait", str(wait)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=self.root, env={**os.environ, "NO_COLOR": "1"})

    def start(self, wait: float = 150) -> None:
        self.cli("start", "--detach", "--wait", str(wait), timeout=wait + 30, check=True)

    def stop(self) -> None:
        self.cli("stop", timeout=90)

    def log(self, name: str) -> str:
        try:
            return (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def errors_logged(self, per_file: int = 3) -> str:
        found = []
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            lines = [line for line in path.read_text(errors="replace").splitlines()
                     if "rror" in line or "FATAL" in line or "cannot" in line]
            found += [f"  {self.node}/{path.name}: {line[:300]}" for line in lines[-per_file:]]
        return "\n".join(found)


class Cluster:
    """The three hosts (not started): `hosts[0]` is host 1."""

    def __init__(self, hosts: list[Host], *, procfile: str = PROCFILE, services: dict[int, str] | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="meshvisor-cluster-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.token = str(uuid.uuid4())
        first = hosts[0].address
        network = first.rsplit(".", 1)[0] + ".0/24"
        self.hosts = [ClusterHost(h, self.base, self.config(h, first, network, (services or {}).get(h.index)),
                                  procfile) for h in hosts]
        self.gateway = f"http://{first}:{GATEWAY_PORT}"
        self.consul = f"http://{first}:{CONSUL_HTTP}"

    def config(self, host: Host, first: str, network: str, services: str | None) -> str:
        server = host.index == 1
        consul = (f'role = "server"\naddress = "{host.address}:{CONSUL_HTTP}"' if server else
                  f'role = "client"\njoin = ["{first}"]')
        postgres = (f'port = {POSTGRES_PORT}\nlisten = "{host.address}"\nallow = ["{network}"]' if server else
                    f'mode = "peer"\naddress = "{first}:{POSTGRES_PORT}"')
        return f"""
[supervisor]
advertise = "{host.address}"

[restart]
backoff_initial = 0.2
backoff_max = 1.0

[consul]
{consul}
bind = "{host.address}"
node_name = "host{host.index}"
encrypt = "{self.key}"
token = "{self.token}"

[postgres]
{postgres}

[prometheus]
mode = "off"

{services if services is not None else self.app_services(host.index)}
"""

    @staticmethod
    def app_services(index: int) -> str:
        counts = {1: (1, 1, 0), 2: (0, 1, 1), 3: (0, 1, 1)}[index]
        return f"""
[services.gateway]
instances = {counts[0]}
port = {GATEWAY_PORT}
sidecar = false
env = {{ GATEWAY_DRAIN_SECONDS = "0.5" }}

[services.auth]
instances = {counts[1]}
route = "/api/v1/auth"
openapi = "/openapi.json"
database = "auth"
drain_seconds = 1.0

[services.example]
instances = {counts[2]}
route = "/api/v1/example"
openapi = "/openapi.json"
database = "example"
upstreams = ["auth"]
idempotency_key = true
drain_seconds = 1.0
"""

    def consul_get(self, path: str):
        """Host 1's agent (anonymous: reads services and nodes)."""
        with urllib.request.urlopen(self.consul + path, timeout=5) as resp:
            return json.loads(resp.read())

    def passing_nodes(self, service: str) -> list[str]:
        return sorted(e["Node"]["Node"] for e in self.consul_get(f"/v1/health/connect/{service}?passing"))

    def cleanup(self) -> None:
        """Kill the client hosts outright: all they have lives in their namespace and
        their folder, both removed, and their clean stop takes seconds (the instances
        drain, then Consul's leave alone takes ~4 s). Stop the server host cleanly: its
        PostgreSQL leaves shared memory behind when killed. Then kill whatever is left."""
        for h in self.hosts[1:]:
            h.host.kill_all()
        try:
            self.hosts[0].stop()
        except (subprocess.SubprocessError, OSError):
            pass
        self.hosts[0].host.kill_all()
        shutil.rmtree(self.base, ignore_errors=True)
