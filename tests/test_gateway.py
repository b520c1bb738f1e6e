"""The gateway, started by the supervisor with services behind sidecars, on a real Consul agent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import ssl
import time
import urllib.request

import aiohttp
import psutil
import pytest

from tests.helpers import Project, free_port, mesh_project, wait_for


@pytest.fixture
def make_stack(agent):
    made = []

    def make(services: dict[str, str], gateway_env: str = "") -> Project:
        port = free_port()
        p = mesh_project(agent.address, services, gateway_port=port, gateway_env=gateway_env)
        p.url = f"http://127.0.0.1:{port}"
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


def get(url: str, headers: dict | None = None, tls: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=tls) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def error_shape(body: bytes, status: int) -> dict:
    data = json.loads(body)
    assert set(data) == {"status", "error", "message", "request_id"}, data
    assert data["status"] == status and "Traceback" not in data["message"]
    return data


def routes(p: Project) -> dict:
    return json.loads(get(f"{p.url}/health")[2])["routes"]


def test_routes_follow_registrations_longest_prefix_and_error_shapes(make_stack, agent):
    p = make_stack({
        "api": 'route = "/api/v1/api"\ninstances = 2',
        "deep": 'route = "/api/v1/api/deep"',
        "slow": 'route = "/api/v1/slow"',
    }, gateway_env=', GATEWAY_REQUEST_TIMEOUT = "1"')
    p.start()
    status, _, body = get(f"{p.url}/health")
    health = json.loads(body)
    assert status == 200 and health["message"] == "API Gateway is running" and health["status"] == 200
    assert isinstance(health["timestamp"], int)
    wait_for(lambda: routes(p).get("/api/v1/api", {}).get("instances") == 2, 5, what="api route with 2 instances")
    assert routes(p)["/api/v1/api/deep"] == {"service": "deep", "instances": 1}

    def served_by(path: str) -> str:
        status, _, body = get(p.url + path)
        assert status == 200, (path, status, body)
        return json.loads(body)["headers"].get("X-Forwarded-Host", "") and json.loads(body)["path"]

    pids = {r["process"]: r["pid"] for r in p.rows()}
    status, _, body = get(f"{p.url}/api/v1/api/deep/x?q=1")
    assert status == 200 and json.loads(body)["pid"] == pids["deep.1"], "longest prefix wins"
    assert json.loads(body)["path"] == "/api/v1/api/deep/x?q=1", "path and query pass through untouched"
    status, _, body = get(f"{p.url}/api/v1/api/other")
    assert json.loads(body)["pid"] in (pids["api.1"], pids["api.2"])
    assert get(f"{p.url}/api/v1/api")[0] == 200

    # Unknown paths: 404 in the shared shape (a prefix must match a whole segment).
    status, headers, body = get(f"{p.url}/api/v1/apix")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert error_shape(body, 404)["request_id"] == headers["X-Request-Id"]

    # A slow instance: 504 in the shared shape after the request timeout.
    status, _, body = get(f"{p.url}/api/v1/slow/sleep/3")
    assert status == 504 and error_shape(body, 504)["error"] == "gateway_timeout"

    # Scaling deep to 0 removes its route: its paths fall back to the shorter prefix.
    p.cli("scale", "deep=0", check=True)
    wait_for(lambda: "/api/v1/api/deep" not in routes(p), 5, interval=0.05, what="deep route gone")
    status, _, body = get(f"{p.url}/api/v1/api/deep/x")
    assert status == 200 and json.loads(body)["pid"] in (pids["api.1"], pids["api.2"])
    p.cli("scale", "deep=1", check=True)
    wait_for(lambda: "/api/v1/api/deep" in routes(p), 5, interval=0.05, what="deep route back")


def test_no_healthy_instance_is_503(make_stack, agent):
    p = make_stack({"api": 'route = "/api/v1/api"\nstart_timeout = 3\n[services.api.restart]\nmax_retries = 1'})
    p.start()
    rows = {r["process"]: r for r in p.rows()}
    # The app goes away for good (FATAL after its retry); its sidecar stays registered, critical.
    os.kill(rows["api.1"]["pid"], signal.SIGSTOP)  # hangs: health fails, the sidecar reports critical
    try:
        wait_for(lambda: routes(p)["/api/v1/api"]["instances"] == 0, 10, interval=0.1, what="no passing instance")
        status, _, body = get(f"{p.url}/api/v1/api/x")
        assert status == 503 and "no healthy instance of api" in error_shape(body, 503)["message"]
    finally:
        os.kill(rows["api.1"]["pid"], signal.SIGCONT)
    wait_for(lambda: routes(p)["/api/v1/api"]["instances"] == 1, 10, interval=0.1, what="instance back")
    assert get(f"{p.url}/api/v1/api/x")[0] == 200


def test_request_id_and_forwarded_headers(make_stack, agent):
    p = make_stack({"api": 'route = "/api/v1/api"'})
    p.start()
    status, headers, body = get(f"{p.url}/api/v1/api/h", {
        "Keep-Alive": "timeout=5", "TE": "trailers", "X-Forwarded-For": "10.9.8.7", "Proxy-Authorization": "x",
    })
    seen = json.loads(body)["headers"]
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"]), "generated and returned to the client"
    assert seen["X-Request-Id"] == headers["X-Request-Id"], "the same id reaches the app"
    assert seen["traceparent"].startswith(f"00-{headers['X-Request-Id']}-")
    assert seen["X-Forwarded-For"].startswith("10.9.8.7, 127.0.0.1")
    assert seen["X-Forwarded-Proto"] == "http" and seen["X-Forwarded-Host"] == p.url.removeprefix("http://")
    for hop in ("Keep-Alive", "TE", "Proxy-Authorization"):
        assert hop not in seen, f"hop-by-hop header {hop} was forwarded"
    status, headers, body = get(f"{p.url}/api/v1/api/h", {"X-Request-Id": "client-42", "traceparent":
                                 "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}  # names are case-insensitive
    assert headers["X-Request-Id"] == "client-42" and seen["x-request-id"] == "client-42"
    assert seen["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_large_bodies_stream_and_the_limit_gives_413(make_stack, agent):
    p = make_stack({"api": 'route = "/api/v1/api"'}, gateway_env=f', GATEWAY_MAX_BODY = "{30 * 1024 * 1024}"')
    p.start()
    size = 20 * 1024 * 1024
    body = os.urandom(1 << 20) * 20

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(f"{p.url}/api/v1/api/upload", data=body) as resp:
                assert resp.status == 200
                got = await resp.json()
                assert got["length"] == size and got["sha256"] == hashlib.sha256(body).hexdigest()
            digest = hashlib.sha256()
            async with session.get(f"{p.url}/api/v1/api/bytes/{size}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(1 << 20):
                    digest.update(chunk)
            assert digest.hexdigest() == hashlib.sha256((bytes(range(256)) * 4096) * 20).hexdigest()
            async with session.post(f"{p.url}/api/v1/api/upload", data=b"x" * (31 * 1024 * 1024)) as resp:
                assert resp.status == 413
                data = await resp.json()
                assert data["error"] == "payload_too_large" and data["status"] == 413

    asyncio.run(run())


def test_instance_killed_mid_burst_and_consul_down_lose_nothing(make_stack, agent):
    p = make_stack({"api": 'route = "/api/v1/api"\ninstances = 3'})
    p.start()
    wait_for(lambda: routes(p)["/api/v1/api"]["instances"] == 3, 5, what="3 instances routed")
    victim = next(r["pid"] for r in p.rows("api") if r["process"] == "api.2")

    async def burst(total: int, during=None) -> list:
        statuses = []
        queue = list(range(total))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async def worker():
                while queue:
                    n = queue.pop()
                    if during is not None and n == total // 2:
                        during()
                    try:
                        async with session.get(f"{p.url}/api/v1/api/n/{n}") as resp:
                            await resp.read()
                            statuses.append(resp.status)
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        statuses.append(repr(exc))
            await asyncio.gather(*(worker() for _ in range(10)))
        return statuses

    statuses = asyncio.run(burst(900, during=lambda: os.kill(victim, signal.SIGKILL)))
    failed = [s for s in statuses if s != 200]
    print(f"gateway: 900 requests, one of 3 apps killed mid-burst: {len(failed)} failed")
    assert not failed, failed[:5]

    agent.stop()
    try:
        time.sleep(0.5)
        statuses = asyncio.run(burst(300))
        print(f"gateway with Consul stopped: 300 requests, {sum(s != 200 for s in statuses)} failed")
        assert statuses == [200] * 300, "the last known table keeps serving"
    finally:
        agent.start()
    gateway_log = p.log("gateway.1")
    assert gateway_log.count("unreachable") <= 4, "Consul being down is logged once per watch, not per request"


def test_openapi_merge_and_swagger_ui_assets(make_stack, agent):
    p = make_stack({
        "api": 'route = "/api/v1/api"\nopenapi = "/openapi.json"',
        "shop": 'route = "/api/v1/shop"\nopenapi = "/openapi.json"',
    })
    p.start()
    wait_for(lambda: len(routes(p)) == 2, 5, what="both routes")
    status, _, body = get(f"{p.url}/api-docs/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/api/v1/api/things", "/api/v1/shop/things"}
    assert doc["paths"]["/api/v1/api/things"]["get"]["tags"] == ["api"]
    # Both services define a different "Thing": neither is lost.
    assert {"api_Thing", "shop_Thing"} & set(doc["components"]["schemas"]) or len(doc["components"]["schemas"]) == 2
    # A new service appears in the document once it is routed.
    p.cli("scale", "api=0", check=True)
    wait_for(lambda: "/api/v1/api/things" not in json.loads(get(f"{p.url}/api-docs/openapi.json")[2])["paths"],
             10, interval=0.2, what="api paths gone from the merged document")

    # Swagger UI: the page and every asset it references come from the gateway itself.
    assert get(f"{p.url}/api-docs")[0] == 200  # redirected to /api-docs/
    status, headers, page = get(f"{p.url}/api-docs/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
    assert len(assets) >= 4
    for asset in assets:
        assert not asset.startswith(b"http"), "no CDN: the machines are offline"
        status, _, content = get(f"{p.url}/api-docs/{asset.decode()}")
        assert status == 200 and len(content) > 100, asset
    status, _, js = get(f"{p.url}/api-docs/swagger-initializer.js")
    assert b"/api-docs/openapi.json" in js


def test_two_gateway_processes_share_the_port(make_stack, agent):
    p = make_stack({"api": 'route = "/api/v1/api"'})
    p.start()
    p.cli("scale", "gateway=2", check=True)
    gateways = [r for r in p.rows("gateway") if r["state"] == "RUNNING"]
    assert len(gateways) == 2 and {r["port"] for r in gateways} == {int(p.url.rsplit(":", 1)[1])}
    wait_for(lambda: len(agent.passing("gateway")) == 2, 5, what="both gateways registered")
    assert {r["consul"] for r in p.rows("gateway")} == {"passing"}, "status shows the gateways' Consul health"
    for n in range(200):
        assert get(f"{p.url}/api/v1/api/n/{n}")[0] == 200
    time.sleep(0.3)  # access logs are written in batches
    assert all('"path":"/api/v1/api/n/' in p.log(f"gateway.{i}") for i in (1, 2)), "both processes served"


def test_sidecars_and_apps_on_this_host_are_reached_through_unix_sockets(make_stack, agent):
    p = make_stack({"api": 'route = "/api/v1/api"',
                    "plain": 'route = "/api/v1/plain"\nsidecar_env = { SIDECAR_UNIX_SOCKET = "0" }',
                    "sock": 'route = "/api/v1/sock"\napp_socket = true'})
    p.start()
    wait_for(lambda: len(routes(p)) == 3, 5, what="every route")
    registered = {name: agent.passing(name)[0] for name in ("api", "plain")}
    assert registered["api"]["Meta"]["unix_socket"].startswith("@meshvisor/")
    assert registered["api"]["Meta"]["host_id"], "announced with where it runs"
    assert "unix_socket" not in registered["plain"]["Meta"], "switched off in its sidecar_env"

    def via(name: str) -> str:  # how the app was reached by its sidecar ("" if it was not)
        status, _, body = get(f"{p.url}/api/v1/{name}/x")
        return json.loads(body)["via"] if status == 200 else ""

    for _ in range(10):
        assert (via("api"), via("plain"), via("sock")) == ("tcp", "tcp", "unix")
    gateway = psutil.Process(p.rows("gateway")[0]["pid"])
    tcp_peers = {c.raddr.port for c in gateway.net_connections("tcp") if c.raddr}
    assert registered["plain"]["Port"] in tcp_peers
    assert registered["api"]["Port"] not in tcp_peers, "on this host: through the socket, not TCP"
    # Linux shows an accepted Unix connection under its listener's name: the listener + one.
    sidecar = psutil.Process(next(r["pid"] for r in p.rows("api") if r["role"] == "sidecar"))
    named = [c for c in sidecar.net_connections("unix") if c.laddr == registered["api"]["Meta"]["unix_socket"]]
    assert len(named) >= 2, named

    # The app killed and restarted on the same socket path. Asked directly (the gateway
    # drops the route while the app is down), the sidecar finds the socket refused while
    # the app is away and goes to TCP, and back to the socket SOCKET_RETRY (5 s) later.
    sidecar_url = f"https://127.0.0.1:{agent.passing('sock')[0]['Port']}/x"  # mTLS, as the gateway
    as_gateway = agent.identity("gateway")
    app = next(r for r in p.rows("sock") if r["role"] == "app")
    os.kill(app["pid"], signal.SIGKILL)
    seen, deadline = [], time.monotonic() + 15
    while time.monotonic() < deadline and (not seen or seen[-1] != "unix"):
        status, _, body = get(sidecar_url, tls=as_gateway)
        seen.append(json.loads(body)["via"] if status == 200 else status)
        time.sleep(0.02)
    assert seen[-1] == "unix", seen[-5:]
    assert 502 in seen and "tcp" in seen[seen.index(502):], "down: refused; back: TCP, then the socket"
    p.cli("stop", check=True)
    assert not list((p.state_dir / "run").glob("app-*.sock")), "socket files removed with their instances"
