"""Cross-host hop against same-host hop: what reaching an instance on another host costs.

Two hosts of one meshvisor cluster on this machine (network namespaces on a bridge,
tests/netns.py; one supervisor and Consul agent per host, tests/cluster.py): host 1 runs
the Consul server, the gateway (port 3000) and `web1` (route /one); host 2 a Consul
client and `web2` (route /two). Both run the same tiny app behind a sidecar
(app_socket = true): tests/programs/web.py, or with --app bench bench/app.py (the aiohttp
app of bench-sidecar and bench-gateway, which leaves the proxies more of the cores). So
the two paths differ only in the gateway's hop, both mTLS:

  same host    wrk -> gateway (host 1) -> web1's sidecar (host 1, abstract Unix socket) -> app
  cross host   wrk -> gateway (host 1) -> web2's sidecar (host 2, TCP over veth + bridge) -> app

wrk runs in the root namespace against http://<host 1>:3000/one/ and /two/. The paths are
measured interleaved in the same run (bench/harness.py: wrk -t1 -c50, medians over
rounds); CPU per request of the gateway, of the sidecar on the path and of the
supervisor(s) filing their access lines, from /proc. Prints the table and the difference
cross - same in us/req per proxy. Run with `make bench-hosts` (root: namespaces).
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import sys
import time
import urllib.request

from bench.harness import ROOT, Path_, by_kind, machine, measure, render, reset, table_rows
from tests.cluster import GATEWAY_PORT, PY, Cluster, ClusterHost
from tests.helpers import PROGRAMS
from tests.netns import Hosts, available

APPS = {"web": PROGRAMS / "web.py", "bench": ROOT / "bench" / "app.py"}  # web1 and web2 run the same app


def services(index: int) -> str:
    gateway, web1, web2 = (1, 1, 0) if index == 1 else (0, 0, 1)
    web = "\n".join(f'[services.web{n}]\ninstances = {count}\nroute = "/{route}"\napp_socket = true\n'
                    f"drain_seconds = 0.2\n" for n, count, route in ((1, web1, "one"), (2, web2, "two")))
    return (f'[services.gateway]\ninstances = {gateway}\nport = {GATEWAY_PORT}\nsidecar = false\n'
            f'env = {{ GATEWAY_DRAIN_SECONDS = "0.2" }}\n\n{web}')


def status(host: ClusterHost) -> dict:
    return json.loads(host.cli("status", "--json", check=True).stdout)


def pid(host: ClusterHost, service: str, role: str) -> int:
    rows = [r for r in status(host)["processes"] if r["service"] == service and r["role"] == role]
    if len(rows) != 1 or rows[0]["state"] != "RUNNING":
        raise RuntimeError(f"{host.node}: expected one running {service} {role}, got {rows}")
    return rows[0]["pid"]


def routed(cluster: Cluster, timeout: float = 90) -> None:
    """Until the gateway routes /one and /two to one instance each."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(cluster.gateway + "/health", timeout=2) as resp:
                routes = json.loads(resp.read())["routes"]
            if all(routes.get(r, {}).get("instances") == 1 for r in ("/one", "/two")):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the gateway did not route /one and /two within {timeout}s")


def unix_peers(host: ClusterHost, service: str) -> int:
    """Connected stream sockets in `host` on the abstract socket of `service`'s sidecar."""
    out = host.host.run(["ss", "-Hx"], capture_output=True, text=True).stdout
    return sum(f"@meshvisor/{service}" in line for line in out.splitlines())


def run(cluster: Cluster, args) -> str:
    one, two = cluster.hosts
    for h in cluster.hosts:
        print(f"starting {h.node} ({h.address})", file=sys.stderr)
        h.start()
    routed(cluster)
    gateway, sup1, sup2 = pid(one, "gateway", "app"), status(one)["supervisor"]["pid"], status(two)["supervisor"]["pid"]
    kinds = ["gateway", "sidecar"]
    same = Path_("same host: gateway -> sidecar (unix)", f"{cluster.gateway}/one/",
                 [gateway, pid(one, "web1", "sidecar")], kinds, {"supervisor": [sup1]})
    cross = Path_("cross host: gateway -> sidecar (tcp)", f"{cluster.gateway}/two/",
                  [gateway, pid(two, "web2", "sidecar")], kinds, {"supervisor": [sup1, sup2]})
    paths = [same, cross]
    print(f"warming up, then {args.rounds} rounds of {args.seconds:g}s per path", file=sys.stderr)
    measure(paths, 1, args.warmup)
    reset(paths)
    transport = f"unix connections to web1's sidecar on host 1 after the warm-up: {unix_peers(one, 'web1')}"
    measure(paths, args.rounds, args.seconds)

    med = statistics.median
    extra = [("gateway us", lambda p: f"{by_kind(p)['gateway']:.1f}"),
             ("sidecar us", lambda p: f"{by_kind(p)['sidecar']:.1f}"),
             ("supervisor us", lambda p: f"{med(p.others_us['supervisor']):.1f}"),
             ("CPU vs same host", lambda p: f"{med(p.cpu_us) / med(same.cpu_us):.2f}x")]
    rows = table_rows(paths, same, extra=extra)
    rows[0] = (*rows[0][:-1], "req/s vs same host")

    def added(kind: str | None) -> str:
        """cross - same, round by round (the two ran back to back): median and range."""
        def cpu(p: Path_) -> list[float]:
            return [sum(v for v, k in zip(r, p.kinds) if kind is None or k == kind) for r in p.cpu_each]
        deltas = sorted(c - s for s, c in zip(cpu(same), cpu(cross)))
        return f"{med(deltas):+.1f} us/req ({deltas[0]:+.1f}..{deltas[-1]:+.1f})"

    return "\n".join([
        f"\nhosts benchmark, {datetime.date.today()}, {machine()}, 2 hosts (network namespaces on a bridge), "
        f"app {APPS[args.app].relative_to(ROOT)}, wrk -t1 -c50 from the root namespace, "
        f"{args.rounds} rounds x {args.seconds:g}s, medians",
        render(rows, args.markdown),
        f"a cross-host hop adds, per round (median, range): gateway {added('gateway')}, sidecar {added('sidecar')}, "
        f"both {added(None)}; p50 {med(cross.p50) - med(same.p50):+.2f} ms",
        f"({transport}; proxy CPU = gateway + sidecar on the path; supervisor = the supervisor(s) filing "
        f"their access lines)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded warm-up round per path")
    parser.add_argument("--app", choices=APPS, default="web", help="the app behind both sidecars")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = parser.parse_args()
    if reason := available():
        sys.exit(f"bench-hosts: {reason}")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind like Ctrl-C: everything is stopped
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    with Hosts(2) as hosts:
        procfile = f"gateway: {PY} -m services.gateway\n" + "".join(f"web{n}: {PY} {APPS[args.app]}\n" for n in (1, 2))
        cluster = Cluster(list(hosts), procfile=procfile, services={1: services(1), 2: services(2)})
        try:
            report = run(cluster, args)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            print("stopping the hosts", file=sys.stderr)
            cluster.cleanup()
    print(report)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process of the benchmark is stopped")
