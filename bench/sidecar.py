"""Sidecar benchmark: one small JSON endpoint of an aiohttp app, reached

  direct    client -> app
  inbound   client -> sidecar (public listener) -> app
  upstream  client -> sidecar B (upstream listener, Consul-resolved) -> sidecar A -> app
  upstream, mTLS   the same, mTLS with Connect leaves between the sidecars (the default)
  ... forked        the inbound and mTLS paths again through sidecars forked by a fork server
                   (as the supervisor starts them; [supervisor] fork_sidecars), A/B in one run
  Consul Connect   client -> `consul connect proxy -upstream` -> `-sidecar-for` -> app
                   (Consul's own built-in proxy pair, also mTLS, from the same binary)

Prints requests/s, p50/p99 and the CPU each proxy spends per request, with ratios to
the direct path. Run with `make bench-sidecar` (installs wrk if missing).
"""

from __future__ import annotations

import argparse
import datetime
import sys

from bench.harness import (Path_, Processes, bench_app, connect_proxy_pair, consul_dev_agent, free_port, machine,
                           measure, reset, table, wait_http)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-access-log", action="store_true", help="switch the sidecars' access log off")
    args = parser.parse_args()

    with Processes() as procs:
        consul = consul_dev_agent(procs)
        app_port, app_socket = bench_app(procs)
        public, admin_a = free_port(), free_port()
        client_public, admin_b, upstream = free_port(), free_port(), free_port()
        # Plain unless said otherwise: wrk, in front, has no Connect leaf to present.
        common = {"CONSUL_HTTP_ADDR": consul, "SIDECAR_ACCESS_LOG": "0" if args.no_access_log else "1",
                  "SIDECAR_DRAIN_SECONDS": "0", "APP_SOCKET": app_socket, "MESH_MTLS": "0"}
        sidecar_a = procs.start([sys.executable, "-m", "sidecar"], {
            **common, "SERVICE_NAME": "bench", "INSTANCE_INDEX": "1", "SIDECAR_PORT": str(public),
            "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(admin_a)}, name="sidecar-a")
        # Sidecar B fronts the same app (it needs a healthy app to register) and holds
        # the upstream listener through which "bench" is called.
        sidecar_b = procs.start([sys.executable, "-m", "sidecar"], {
            **common, "SERVICE_NAME": "caller", "INSTANCE_INDEX": "1", "SIDECAR_PORT": str(client_public),
            "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(admin_b),
            "SIDECAR_UPSTREAMS": f"bench={upstream}"}, name="sidecar-b")
        # The same pair with mTLS between the sidecars (Connect leaves, intentions asked
        # per caller): what every hop the mesh owns costs by default.
        tls_public, tls_admin_a, tls_client, tls_admin_b, tls_upstream = (free_port() for _ in range(5))
        tls_a = procs.start([sys.executable, "-m", "sidecar"], {
            **common, "MESH_MTLS": "1", "SERVICE_NAME": "benchtls", "INSTANCE_INDEX": "1",
            "SIDECAR_PORT": str(tls_public), "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(tls_admin_a)},
            name="sidecar-tls-a")
        tls_b = procs.start([sys.executable, "-m", "sidecar"], {
            **common, "MESH_MTLS": "1", "SERVICE_NAME": "callertls", "INSTANCE_INDEX": "1",
            "SIDECAR_PORT": str(tls_client), "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(tls_admin_b),
            "SIDECAR_UPSTREAMS": f"benchtls={tls_upstream}"}, name="sidecar-tls-b")
        # The same inbound sidecar and mTLS pair, forked as the supervisor forks them.
        fork_public, fork_admin, ftls_public, ftls_admin_a, ftls_client, ftls_admin_b, ftls_upstream = (
            free_port() for _ in range(7))
        fork_a = procs.fork_sidecar({
            **common, "SERVICE_NAME": "benchfork", "INSTANCE_INDEX": "1", "SIDECAR_PORT": str(fork_public),
            "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(fork_admin)}, name="sidecar-fork-a")
        ftls_a = procs.fork_sidecar({
            **common, "MESH_MTLS": "1", "SERVICE_NAME": "benchforktls", "INSTANCE_INDEX": "1",
            "SIDECAR_PORT": str(ftls_public), "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(ftls_admin_a)},
            name="sidecar-fork-tls-a")
        ftls_b = procs.fork_sidecar({
            **common, "MESH_MTLS": "1", "SERVICE_NAME": "callerforktls", "INSTANCE_INDEX": "1",
            "SIDECAR_PORT": str(ftls_client), "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(ftls_admin_b),
            "SIDECAR_UPSTREAMS": f"benchforktls={ftls_upstream}"}, name="sidecar-fork-tls-b")
        connect_upstream, connect_pids = connect_proxy_pair(procs, consul, app_port)
        wait_http(f"http://127.0.0.1:{public}/")
        wait_http(f"http://127.0.0.1:{upstream}/")
        wait_http(f"http://127.0.0.1:{tls_upstream}/")
        wait_http(f"http://127.0.0.1:{fork_public}/")
        wait_http(f"http://127.0.0.1:{ftls_upstream}/")

        direct = Path_("direct (app)", f"http://127.0.0.1:{app_port}/")
        paths = [
            direct,
            Path_("inbound (sidecar -> app)", f"http://127.0.0.1:{public}/", [sidecar_a.pid]),
            Path_("upstream (sidecar -> sidecar -> app)", f"http://127.0.0.1:{upstream}/",
                  [sidecar_a.pid, sidecar_b.pid]),
            Path_("upstream, mTLS (sidecar -> sidecar -> app)", f"http://127.0.0.1:{tls_upstream}/",
                  [tls_a.pid, tls_b.pid]),
            Path_("inbound, forked sidecar", f"http://127.0.0.1:{fork_public}/", [fork_a.pid]),
            Path_("upstream, mTLS, forked sidecars", f"http://127.0.0.1:{ftls_upstream}/",
                  [ftls_a.pid, ftls_b.pid]),
            Path_("Consul Connect proxy pair (mTLS)", f"http://127.0.0.1:{connect_upstream}/", connect_pids),
        ]
        print(f"warming up, then {args.rounds} rounds of {args.seconds:g}s per path", file=sys.stderr)
        measure(paths, 1, 2)  # warm-up round, discarded
        reset(paths)
        measure(paths, args.rounds, args.seconds)
        print(f"\nsidecar benchmark, {datetime.date.today()}, {machine()}, wrk -t1 -c50, "
              f"{args.rounds} rounds x {args.seconds:g}s, medians; access log {'off' if args.no_access_log else 'on'}")
        print(table(paths, direct))
        print("proxy CPU us/req: utime+stime of the sidecar process(es) on the path / requests served "
              "(upstream path: both sidecars together)")


if __name__ == "__main__":
    main()
