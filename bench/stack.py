"""The real stack for the benchmark report, started by the real supervisor.

A throw-away project folder under /tmp (Procfile + config/meshvisor.toml, state dir
inside it) runs the shipped services (gateway, auth, example) with their sidecars, on a
Consul agent given by address and an embedded PostgreSQL on a free port. Everything is
driven through the `supervisor` CLI (`start --detach`, `status --json`, `scale`, `stop`),
as an operator would; `close()` makes sure nothing of it is left running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

# The tests' port helpers: ports below the kernel's ephemeral range, which no outgoing
# connection (the gateway's pools, wrk's) can take between choosing one and binding it.
from supervisor.state import clean_leftovers
from tests.helpers import free_port, free_range

PY = sys.executable

CONFIG = """
[supervisor]
port_range = [{low}, {high}]
start_timeout = 60.0

[consul]
mode = "external"
address = "{consul}"

[prometheus]
mode = "off"

[postgres]
port = {postgres}

[services.gateway]
port = {gateway}
sidecar = false
env = {{ GATEWAY_DRAIN_SECONDS = "0.5" }}

[services.auth]
instances = 1
route = "/api/v1/auth"
openapi = "/openapi.json"
database = "auth"
app_socket = true
drain_seconds = 0.5

[services.example]
instances = 1
route = "/api/v1/example"
openapi = "/openapi.json"
database = "example"
upstreams = ["auth"]
app_socket = true
drain_seconds = 0.5
"""


class Stack:
    def __init__(self, consul: str) -> None:
        # /tmp and mode 0755: PostgreSQL runs as the `postgres` user when we are root and
        # must reach its data directory inside the state dir.
        self.root = Path(tempfile.mkdtemp(prefix="meshvisor-bench-stack-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        (self.root / "config").mkdir()
        (self.root / "Procfile").write_text(
            f"gateway: {PY} -m services.gateway\nauth: {PY} -m services.auth\nexample: {PY} -m services.example\n")
        low, high = free_range(60)
        self.gateway_port = free_port()
        self.config = self.root / "config" / "meshvisor.toml"
        self.config.write_text(CONFIG.format(low=low, high=high, consul=consul, postgres=free_port(),
                                             gateway=self.gateway_port))
        self.state_dir = self.root / ".state"
        self.consul = consul
        self.url = f"http://127.0.0.1:{self.gateway_port}"

    # -- the supervisor CLI -------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([PY, "-m", "supervisor", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              env={**os.environ, "NO_COLOR": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"supervisor {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                               f"\nlogs in {self.state_dir / 'logs'}")
        return proc.stdout

    def start(self, timeout: float = 150) -> None:
        self.cli("start", "--detach", "--wait", str(timeout), timeout=timeout + 30)

    def processes(self) -> list[dict]:
        return json.loads(self.cli("status", "--json"))["processes"]

    def supervisor(self) -> int:
        """The supervisor's own pid (it files every process's output, access logs included)."""
        return json.loads(self.cli("status", "--json"))["supervisor"]["pid"]

    def pids(self, service: str, role: str = "app") -> list[int]:
        """Pids of the running processes of `service` with `role` (app or sidecar), by instance."""
        rows = sorted((r for r in self.processes() if r["service"] == service and r["role"] == role),
                      key=lambda r: r["instance"])
        return [r["pid"] for r in rows]

    def ports(self, service: str, role: str = "app") -> list[int]:
        rows = sorted((r for r in self.processes() if r["service"] == service and r["role"] == role),
                      key=lambda r: r["instance"])
        return [r["port"] for r in rows]

    def scale(self, service: str, count: int) -> None:
        """Scale and wait until the new set is running, passing in Consul and routed to by
        every gateway process."""
        self.cli("scale", f"{service}={count}")
        self.wait_settled(service, count)

    def wait_settled(self, service: str, count: int) -> None:
        self._wait(lambda: self._settled(service, count), f"{service}={count} running and routed")

    def _settled(self, service: str, count: int) -> bool:
        rows = [r for r in self.processes() if r["service"] == service]
        if len({r["instance"] for r in rows}) != count or any(r["state"] != "RUNNING" for r in rows):
            return False
        examples = len(self.pids("example"))
        if len(self.passing("example")) != examples:
            return False
        return self.routed(examples)

    def passing(self, service: str) -> list[dict]:
        return self._get(f"http://{self.consul}/v1/health/service/{service}?passing=true")

    def routed(self, examples: int) -> bool:
        """Every gateway process routes to `examples` instances of example: /health on the
        shared port, on fresh connections (the kernel spreads them over the processes),
        until each gateway instance has answered."""
        gateways = len(self.pids("gateway"))
        seen: dict[int, int] = {}
        for _ in range(20 * gateways):
            try:
                health = self._get(self.url + "/health")
            except (OSError, ValueError):
                return False
            routes = health.get("routes", {}).get("/api/v1/example", {})
            seen[health["instance"]] = routes.get("instances", 0)
            if len(seen) == gateways:
                break
        return len(seen) == gateways and all(n == examples for n in seen.values())

    @staticmethod
    def _get(url: str):
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}")

    # -- data -----------------------------------------------------------------------------

    def call(self, method: str, path: str, body=None, token: str | None = None):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode() if body is not None else None,
                                         method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=15) as resp:
            return json.loads(resp.read())

    def seed(self) -> str:
        """One user and one item of theirs; the item's path (under the example route)."""
        user = {"email": "bench@example.com", "password": "benchmark password", "name": "Bench Mark"}
        self.call("POST", "/api/v1/auth/register", user)
        token = self.call("POST", "/api/v1/auth/login", {"email": user["email"], "password": user["password"]})
        item = self.call("POST", "/api/v1/example/items",
                         {"title": "Benchmark item", "description": "read by wrk", "price_cents": 1999,
                          "tags": ["bench"]}, token=token["access_token"])
        return f"/api/v1/example/items/{item['id']}"

    # -- the end ----------------------------------------------------------------------------

    def close(self) -> None:
        """`supervisor stop`; if that fails, SIGTERM the supervisor, then SIGKILL whatever
        it recorded (process groups in run/pids.json). Then the folder goes."""
        pid = self._supervisor_pid()
        if pid:
            try:
                self.cli("stop", "--timeout", "60", timeout=90)
            except (RuntimeError, subprocess.TimeoutExpired):
                _signal(pid, signal.SIGTERM)
                _wait_gone(pid, 30)
        clean_leftovers(self.state_dir, say=lambda message: None, grace=0)
        # Last net (e.g. interrupted while the supervisor was still starting, before it
        # recorded anything): whatever still runs in this project's folder is ours.
        for proc in self._leftovers():
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _leftovers(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                cwd = proc.cwd()
            except psutil.Error:
                continue
            if cwd == str(self.root) or cwd.startswith(str(self.root) + "/"):
                found.append(proc)
        return found

    def _supervisor_pid(self) -> int | None:
        from supervisor.state import holder_pid

        return holder_pid(self.state_dir)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    _signal(pid, signal.SIGKILL)
