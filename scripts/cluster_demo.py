"""`make cluster-demo`: three meshvisor hosts on this machine, to try what several VMs do.

Each host is a network namespace on a bridge (tests/netns.py) with its own supervisor,
Consul agent and project folder: the same three hosts the tests run (tests/cluster.py).
Host 1 is a Consul server with PostgreSQL and the gateway; hosts 2 and 3 are clients with
example and auth instances. Ctrl-C stops every host cleanly and removes the namespaces.

Needs root (namespaces); every address is in 198.18.0.0/15, the range set aside for tests.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import netns  # noqa: E402
from tests.cluster import Cluster  # noqa: E402


def main() -> int:
    missing = netns.available()
    if missing:
        print(f"cluster-demo: cannot make network namespaces here: {missing}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with netns.Hosts(3) as hosts:
        cluster = Cluster(hosts)
        try:
            for host in cluster.hosts:
                if stop.is_set():
                    return 130
                print(f"starting {host.node} ({host.address}, namespace {host.host.name}) ...", flush=True)
                started = time.monotonic()
                host.start()
                print(f"  {host.node} is up in {time.monotonic() - started:.1f}s", flush=True)
            show(cluster)
            stop.wait()
            print("\nstopping the three hosts ...", flush=True)
        finally:
            cluster.cleanup()
    print("stopped; namespaces removed")
    return 0


def show(cluster: Cluster) -> None:
    first = cluster.hosts[0]
    py = sys.executable
    print(f"""
Three hosts are running (one Consul cluster: host1 server, host2 and host3 clients).

  Gateway         {cluster.gateway}/health   (e.g. curl {cluster.gateway}/api-docs)
  Consul UI       {cluster.consul}/ui   (three nodes; log in with consul.token from {first.config_path})

Run a command on a host (its own supervisor):
  ip netns exec {first.host.name} {py} -m supervisor --config {first.config_path} status --cluster
  ip netns exec {cluster.hosts[1].host.name} {py} -m supervisor --config {cluster.hosts[1].config_path} scale example=2
Let host 3 die (every process, SIGKILL) and watch its instances leave the routes:
  ip netns pids {cluster.hosts[2].host.name} | xargs kill -9
Bring it back:
  ip netns exec {cluster.hosts[2].host.name} {py} -m supervisor --config {cluster.hosts[2].config_path} start --detach

Ctrl-C stops everything.""", flush=True)


if __name__ == "__main__":
    sys.exit(main())
