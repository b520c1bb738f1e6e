"""Gateway benchmark: the small JSON endpoint of an aiohttp app, reached

  direct                  client -> app
  gateway -> sidecar      client -> gateway -> sidecar -> app (routes from Consul; on one
                          host the gateway reaches the sidecar, and the sidecar the app
                          (app_socket), over Unix sockets, as in a stack)
  gateway x2 -> sidecar   the same with two gateway processes sharing the port
  ..., mTLS               gateway -> sidecar with mTLS (Connect leaves, intentions): the default
  Consul Connect pair     `consul connect proxy -upstream` -> `-sidecar-for` -> app (mTLS too)
  nginx                   client -> nginx (1 worker, keep-alive upstream) -> app
  haproxy                 client -> HAProxy (1 thread, http-reuse) -> app
  node express            client -> express + http-proxy-middleware -> app

nginx, HAProxy and express reach the app over TCP, as usually deployed. All in one run,
interleaved rounds (every other one reversed), medians; CPU per request of every proxy
process from /proc. Run with `make bench-gateway` (installs wrk, nginx, HAProxy and the
Node packages if missing).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys

from bench import proxies
from bench.harness import (Path_, Processes, bench_app, connect_proxy_pair, consul_dev_agent, free_port, machine,
                           measure, paired, per_proxy, reset, table, wait_http)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-access-log", action="store_true", help="switch the gateway's and sidecar's access logs off")
    args = parser.parse_args()
    log_flag = "0" if args.no_access_log else "1"

    with Processes() as procs:
        consul = consul_dev_agent(procs)
        app_port, app_socket = bench_app(procs)

        def start_sidecar(service: str, mtls: str):
            public, admin = free_port(), free_port()
            return procs.start([sys.executable, "-m", "sidecar"], {
                "CONSUL_HTTP_ADDR": consul, "SERVICE_NAME": service, "INSTANCE_INDEX": "1",
                "SIDECAR_PORT": str(public), "APP_PORT": str(app_port), "APP_SOCKET": app_socket,
                "SIDECAR_ADMIN_PORT": str(admin), "MESH_MTLS": mtls,
                "SERVICE_ROUTE": f"/api/v1/{service}", "SIDECAR_ACCESS_LOG": log_flag, "SIDECAR_DRAIN_SECONDS": "0"},
                name=f"sidecar-{service}")

        def start_gateway(index: int, port: int, mtls: str):
            admin_port = free_port()
            proc = procs.start([sys.executable, "-m", "services.gateway"], {
                "CONSUL_HTTP_ADDR": consul, "PORT": str(port), "REUSE_PORT": "1", "INSTANCE_INDEX": str(index),
                "ADMIN_PORT": str(admin_port), "GATEWAY_ACCESS_LOG": log_flag, "GATEWAY_DRAIN_SECONDS": "0",
                "MESH_MTLS": mtls}, name=f"gateway{index}")
            wait_http(f"http://127.0.0.1:{admin_port}/health")
            return proc

        # Plain between gateway and sidecar (the figures of earlier runs), and the default:
        # mTLS with Connect leaves, the sidecar asking the intentions per caller.
        sidecar = start_sidecar("bench", "0")
        gw_port, tls_gw_port = free_port(), free_port()
        gateway_one = start_gateway(1, gw_port, "0")
        tls_sidecar = start_sidecar("benchtls", "1")
        tls_gateway = start_gateway(3, tls_gw_port, "1")
        wait_http(f"http://127.0.0.1:{gw_port}/api/v1/bench/")
        wait_http(f"http://127.0.0.1:{tls_gw_port}/api/v1/benchtls/")
        connect_upstream, connect_pids = connect_proxy_pair(procs, consul, app_port)

        nginx_port, nginx_pids = proxies.nginx(procs, [app_port])
        haproxy_port, haproxy_pids = proxies.haproxy(procs, [app_port])
        node_port, node_pids = proxies.node_express(procs, app_port)

        direct = Path_("direct (app)", f"http://127.0.0.1:{app_port}/api/v1/bench/")
        through = Path_("gateway -> sidecar -> app", f"http://127.0.0.1:{gw_port}/api/v1/bench/",
                        [gateway_one.pid, sidecar.pid])
        through_tls = Path_("gateway -> sidecar -> app, mTLS", f"http://127.0.0.1:{tls_gw_port}/api/v1/benchtls/",
                            [tls_gateway.pid, tls_sidecar.pid])
        connect_pair = Path_("Consul Connect proxy pair -> app (mTLS)", f"http://127.0.0.1:{connect_upstream}/api/v1/bench/",
                             connect_pids)
        nginx_path = Path_("nginx -> app", f"http://127.0.0.1:{nginx_port}/api/v1/bench/", nginx_pids)
        node_path = Path_("node express -> app", f"http://127.0.0.1:{node_port}/api/v1/bench/", node_pids)
        # The gateway path and express next to each other: measured back to back (paired).
        paths = [
            direct, through, node_path, nginx_path, through_tls, connect_pair,
            Path_("haproxy -> app", f"http://127.0.0.1:{haproxy_port}/api/v1/bench/", haproxy_pids),
        ]
        print(f"warming up, then {args.rounds} rounds of {args.seconds:g}s per path", file=sys.stderr)
        measure(paths, 1, 2)
        reset(paths)
        measure(paths, args.rounds, args.seconds)

        # A second gateway process on the same port (SO_REUSEPORT). A process sharing the
        # port cannot be paused without stranding the connections the kernel hands it, so
        # this phase comes after the first; direct is measured again as its baseline.
        gateway_two = start_gateway(2, gw_port, "0")
        two = Path_("gateway x2 -> sidecar -> app", through.url, [gateway_one.pid, gateway_two.pid, sidecar.pid])
        direct_again = Path_("direct (app)", direct.url)
        measure([direct_again, two], 1, 2)
        reset([direct_again, two])
        measure([direct_again, two], args.rounds, args.seconds)

        stamp = f"{datetime.date.today()}, {machine()}, wrk -t1 -c50, {args.rounds} rounds x {args.seconds:g}s, medians"
        print(f"\ngateway benchmark, {stamp}; access logs {'off' if args.no_access_log else 'on'}")
        print(table(paths, direct, nginx_path))
        gw, sc = per_proxy(through)
        print(f"gateway -> sidecar CPU split: gateway {gw:.1f} us/req, sidecar {sc:.1f} us/req")
        tls_gw, tls_sc = per_proxy(through_tls)
        print(f"the same with mTLS: gateway {tls_gw:.1f} us/req (+{tls_gw - gw:.1f}), sidecar {tls_sc:.1f} us/req "
              f"(+{tls_sc - sc:.1f}): the mTLS hop costs {tls_gw - gw + tls_sc - sc:.1f} us/req of CPU")
        print(f"mTLS path vs Consul Connect's proxy pair: {paired(through_tls, connect_pair):.2f}x the requests/s")
        rounds = " ".join(f"{x / y:.2f}" for x, y in zip(through.rps, node_path.rps))
        print(f"gateway + sidecar vs node express: {paired(through, node_path):.2f}x the requests/s (median of the "
              f"rounds, each measured back to back: {rounds}; ratio of the medians "
              f"{statistics.median(through.rps) / statistics.median(node_path.rps):.2f}x)")
        print("\nscaling the gateway (SO_REUSEPORT; x2 measured after the rounds above, with direct again):")
        print(table([direct_again, two], direct_again))
        x1 = statistics.median(through.rps) / statistics.median(direct.rps)
        x2 = statistics.median(two.rps) / statistics.median(direct_again.rps)
        print(f"gateway x1: {x1:.2f}x direct; gateway x2: {x2:.2f}x direct (throughput x2/x1 = {x2 / x1:.2f})")
        print("proxy CPU us/req: utime+stime of the proxy processes on the path / requests served")


if __name__ == "__main__":
    if not all(shutil.which(tool) for tool in proxies.TOOLS):
        sys.exit("bench needs wrk, nginx, haproxy and node: run it with `make bench-gateway`")
    main()
