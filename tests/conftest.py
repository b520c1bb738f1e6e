from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from supervisor.infra.consul import find_binary
from tests.helpers import ROOT, free_ports, wait_for


@pytest.fixture(scope="session")
def consul_agent():
    """A real Consul agent (dev mode: in memory, leader at once) shared by the session.

    Yields its HTTP address.
    """
    http, server, serf = free_ports(3)
    data = tempfile.mkdtemp(prefix="meshvisor-consul-")
    proc = subprocess.Popen(
        [find_binary(ROOT), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
         "-http-port", str(http), "-server-port", str(server), "-serf-lan-port", str(serf),
         "-serf-wan-port", "-1", "-dns-port", "-1", "-hcl", "ports { grpc = -1 }", "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=data,
    )
    address = f"127.0.0.1:{http}"

    def leader():
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{address}/v1/status/leader", timeout=1) as r:
                return r.read().strip(b'"\n')
        except OSError:
            return None

    wait_for(leader, 30, what="consul dev agent leader")
    yield address
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(data, ignore_errors=True)
