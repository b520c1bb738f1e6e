"""`supervisor trace`: a request's hops read from every process's log, nested and drawn.

The renderer and the nesting on hand-made log lines; the relay's `attempt` lines on a
real relay; the command on a state dir without a supervisor; and one request through the
real stack (gateway -> example's sidecar -> example -> its upstream listener -> auth's
sidecar -> auth), then one whose call to auth was retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from shared.mesh.balancing import Balancer
from shared.mesh.relay import Relay, RelaySettings, Route
from shared.mesh.telemetry import AccessLog, RelayMetrics
from supervisor import trace, waterfall
from tests.helpers import Project, free_port, wait_for
from tests.stack import app_stack, user

RID = "4bf92f3577b34da6a3ce929d0e0e4736"
STAMP = "2026-11-30T06:00:00.000+00:00 "


def request_line(process_kind: str, service: str, instance: str, method: str, path: str, status: int,
                 end: float, ms: float, upstream: str, rid: str = RID, retries: int = 0) -> dict:
    return {"ts": end, "level": "info", "msg": "request", "service": service, "instance": instance,
            "listener": process_kind, "method": method, "path": path, "status": status, "duration_ms": ms,
            "upstream": upstream, "request_id": rid, "retries": retries}


def listening(public: str, app: str) -> dict:
    return {"ts": 900.0, "level": "info", "logger": "meshvisor.sidecar", "msg": "listening", "public": public,
            "app": app}


def write_logs(folder: Path, files: dict[str, list[dict | str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, entries in files.items():
        text = "".join(STAMP + (e if isinstance(e, str) else json.dumps(e, separators=(",", ":"))) + "\n"
                       for e in entries)
        (folder / name).write_text(text)


USERS = "/api/v1/auth/users/u1"
ITEMS = "/api/v1/example/items"
# A POST through the gateway to example, whose call to auth failed on auth.1 (502: its
# app was down) and was retried on auth.2; auth.2's app logged a line meanwhile. Lines of
# another request (one whose id starts like this one's) and plain text around them.
RETRIED = {
    "gateway.1.log": [
        request_line("gateway", "gateway", "gateway.1", "GET", "/other", 200, 1000.051, 1.0, "127.0.0.1:2001",
                     rid=RID + "0"),
        request_line("gateway", "gateway", "gateway.1", "POST", ITEMS, 201, 1000.050, 50.0, "127.0.0.1:2001"),
    ],
    "example.1.sidecar.log": [
        listening("127.0.0.1:2001", "127.0.0.1:2002"),
        {"ts": 1000.015, "level": "warning", "msg": "attempt", "service": "example", "instance": "example.1",
         "listener": "upstream", "method": "GET", "path": USERS, "status": 502, "duration_ms": 5.0,
         "upstream": "127.0.0.1:3001", "request_id": RID, "attempt": 1, "error": "status_502"},
        request_line("upstream", "example", "example.1", "GET", USERS, 200, 1000.030, 20.0, "127.0.0.1:3011",
                     retries=1),
        request_line("inbound", "example", "example.1", "POST", ITEMS, 201, 1000.049, 47.0, "127.0.0.1:2002"),
    ],
    "example.1.log": ["not JSON at all " + RID,
                      request_line("app", "example", "example.1", "POST", ITEMS, 201, 1000.0485, 46.0, "")],
    "auth.1.sidecar.log": [
        listening("127.0.0.1:3001", "127.0.0.1:3002"),
        request_line("inbound", "auth", "auth.1", "GET", USERS, 502, 1000.0148, 4.0, "127.0.0.1:3002"),
    ],
    "auth.2.sidecar.log": [
        listening("127.0.0.1:3011", "127.0.0.1:3012"),
        request_line("inbound", "auth", "auth.2", "GET", USERS, 200, 1000.0295, 14.0, "127.0.0.1:3012"),
    ],
    "auth.2.log.1": [  # rotated: read too
        request_line("app", "auth", "auth.2", "GET", USERS, 200, 1000.029, 13.0, ""),
        {"ts": 1000.020, "level": "info", "logger": "meshvisor.auth", "msg": "profile read", "component": "app",
         "request_id": RID},
    ],
    "auth.2.log": [],
}


def shape(found: trace.Trace) -> list[tuple]:
    return [(h["depth"], h["process"], h["kind"], h["attempt"], h["status"], h["retried"])
            for h in waterfall.as_json(found)["hops"]]


def test_a_retried_request_nested_in_time_order_and_drawn(tmp_path):
    write_logs(tmp_path, RETRIED)
    found = trace.read(tmp_path, RID)
    assert shape(found) == [
        (0, "gateway.1", "gateway", 0, 201, False),
        (1, "example.1.sidecar", "inbound", 0, 201, False),
        (2, "example.1", "app", 0, 201, False),
        (3, "example.1.sidecar", "upstream", 0, 200, False),
        (4, "example.1.sidecar", "attempt", 1, 502, True),
        (5, "auth.1.sidecar", "inbound", 0, 502, False),
        (4, "example.1.sidecar", "attempt", 2, 200, False),
        (5, "auth.2.sidecar", "inbound", 0, 200, False),
        (6, "auth.2", "app", 0, 200, False),
    ]
    data = waterfall.as_json(found)
    assert data["duration_ms"] == pytest.approx(50.0) and data["hops"][0]["start_ms"] == 0
    first, second = data["hops"][4], data["hops"][6]
    assert (first["upstream"], first["target"], first["error"]) == ("127.0.0.1:3001", "auth.1.sidecar", "status_502")
    assert first["start_ms"] == pytest.approx(10.0) and first["duration_ms"] == pytest.approx(5.0)
    # the last attempt is what the hop's own line says, from the failed one's end
    assert second["target"] == "auth.2.sidecar" and second["start_ms"] == pytest.approx(15.0)
    assert [e["msg"] for e in data["hops"][8]["events"]] == ["profile read"]

    text = waterfall.render(found)
    lines = text.splitlines()
    assert lines[0] == f"request {RID}: POST {ITEMS} -> 201 in 50.00 ms"
    assert lines[1].endswith("; 9 hops, 1 retry")
    rows = lines[4:]
    bars = [row[row.index("|") + 1: row.rindex("|")] for row in rows]
    assert len({len(bar) for bar in bars}) == 1
    assert bars[0].strip() == bars[0] and set(bars[0]) == {"█"}, "the gateway's hop spans the whole request"
    assert "attempt 1 -> auth.1.sidecar status_502, retry" in rows[4] and " 502 " in rows[4]
    assert rows[6].endswith("attempt 2 -> auth.2.sidecar") and "retry" not in rows[6]
    assert rows[3].endswith(f"example.1.sidecar upstream -> auth.2.sidecar GET {USERS}")
    assert rows[2].endswith("    example.1 app"), "indented by depth; same request line as above: not repeated"
    assert rows[9].startswith("   20.00  ") and rows[9].endswith("          info meshvisor.auth: profile read")
    assert bars[9].strip() == "•"
    # bars on one time scale: the retried attempt starts where the upstream hop starts
    assert bars[4].index("█") == bars[3].index("█") and bars[6].rstrip().endswith("█")
    # without unicode, and in a narrow terminal: clipped labels, the bar at its minimum
    narrow = waterfall.render(found, width=60, unicode=False).splitlines()
    assert all(len(row) <= 32 + waterfall.BAR_MIN + waterfall.MIN_LABEL for row in narrow[4:])
    assert any(row.endswith("...") for row in narrow[4:])
    assert "#" in narrow[4] and "█" not in "".join(narrow)


def test_concurrent_calls_nest_by_address_then_by_request_line():
    """Two calls to auth at once from one app: each auth hop under the call that went to
    its sidecar's address; without the addresses (their `listening` lines rotated away),
    under the call with its path."""
    def hops():
        return [
            trace.Hop("example.1", "app", "example", "example.1", "GET", ITEMS, 200, 10.000, 10.050),
            trace.Hop("example.1.sidecar", "inbound", "example", "example.1", "GET", ITEMS, 200, 9.999, 10.051,
                      upstream="127.0.0.1:2002"),
            trace.Hop("example.1.sidecar", "upstream", "example", "example.1", "GET", "/u/a", 200, 10.010, 10.030,
                      upstream="127.0.0.1:3001"),
            trace.Hop("example.1.sidecar", "upstream", "example", "example.1", "GET", "/u/b", 200, 10.011, 10.031,
                      upstream="127.0.0.1:3011"),
            trace.Hop("auth.2.sidecar", "inbound", "auth", "auth.2", "GET", "/u/a", 200, 10.012, 10.028,
                      upstream="127.0.0.1:3012"),
            trace.Hop("auth.1.sidecar", "inbound", "auth", "auth.1", "GET", "/u/b", 200, 10.012, 10.029,
                      upstream="127.0.0.1:3002"),
            trace.Hop("auth.1", "app", "auth", "auth.1", "GET", "/u/b", 200, 10.013, 10.027),
        ]

    addresses = {"127.0.0.1:3001": [(1.0, "auth.2.sidecar")], "127.0.0.1:3011": [(1.0, "auth.1.sidecar")],
                 "127.0.0.1:2002": [(1.0, "example.1")]}
    for known in (addresses, {}):
        found = trace.build(hops(), [], [], known, RID)
        rows = [(d["depth"], d["process"], d["kind"], d["path"]) for d in waterfall.as_json(found)["hops"]]
        assert rows == [
            (0, "example.1.sidecar", "inbound", ITEMS),
            (1, "example.1", "app", ITEMS),
            (2, "example.1.sidecar", "upstream", "/u/a"),
            (3, "auth.2.sidecar", "inbound", "/u/a"),
            (2, "example.1.sidecar", "upstream", "/u/b"),
            (3, "auth.1.sidecar", "inbound", "/u/b"),
            (4, "auth.1", "app", "/u/b"),
        ], known


def test_an_attempt_whose_request_line_is_missing_is_a_hop_of_its_own(tmp_path):
    write_logs(tmp_path, {"example.1.sidecar.log": [
        {"ts": 5.0, "level": "warning", "msg": "attempt", "service": "example", "instance": "example.1",
         "listener": "upstream", "method": "GET", "path": "/x", "status": 0, "duration_ms": 2.0,
         "upstream": "127.0.0.1:9", "request_id": RID, "attempt": 1, "error": "connect_refused"}]})
    text = waterfall.render(trace.read(tmp_path, RID), unicode=False)
    assert "attempt 1 -> 127.0.0.1:9 connect_refused" in text and "1 hop" in text
    with pytest.raises(trace.NotFound):
        trace.read(tmp_path, RID[:-1])  # a prefix of a logged id is another id


# -- the relay's attempt lines -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def relayed(*ports: int, log: AccessLog):
    """A relay (listener "upstream") to instances on these ports, the first preferred."""
    balancer = Balancer("svc")
    balancer.update([(f"svc-{n}", "127.0.0.1", port, {}) for n, port in enumerate(ports)])
    for backend in balancer.backends[1:]:
        backend.inflight += 1000  # never picked while an untried one has fewer
    route = Route("svc", balancer, connect_timeout=2.0)
    relay = Relay(RelaySettings("upstream"), lambda method, target: route, RelayMetrics("t"), log)
    server = await asyncio.get_running_loop().create_server(relay.protocol, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        relay.close()
        for backend in balancer.backends:
            for up in list(backend.idle):
                up.close()


async def get(url: str, rid: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rpartition(":")[2]))
    writer.write(f"GET /x?secret=1 HTTP/1.1\r\nHost: x\r\nX-Request-Id: {rid}\r\nConnection: close\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status


async def test_the_relay_writes_a_line_per_failed_attempt_only_when_it_retried(tmp_path):
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    live = runner.addresses[0][1]
    folder = tmp_path / "logs"
    folder.mkdir()
    fd = os.open(folder / "example.1.sidecar.log", os.O_WRONLY | os.O_CREAT)
    log = AccessLog("example", "example.1", fd=fd)
    try:
        async with relayed(live, log=log) as url:
            assert await get(url, "first-time") == 200
        dead, dead_too = closed_port(), closed_port()
        async with relayed(dead, live, log=log) as url:
            assert await get(url, "second-time") == 200
        async with relayed(dead, dead_too, log=log) as url:
            assert await get(url, "never") == 502
        log.flush()
    finally:
        os.close(fd)
        await runner.cleanup()
    lines = [json.loads(line) for line in (folder / "example.1.sidecar.log").read_text().splitlines()]
    assert [(e["request_id"], e["msg"]) for e in lines] == [
        ("first-time", "request"), ("second-time", "attempt"), ("second-time", "request"),
        ("never", "attempt"), ("never", "attempt"), ("never", "request")]
    attempt = lines[1]
    assert {k: attempt[k] for k in ("listener", "method", "path", "status", "upstream", "attempt", "error")} == {
        "listener": "upstream", "method": "GET", "path": "/x", "status": 0, "upstream": f"127.0.0.1:{dead}",
        "attempt": 1, "error": "connect_refused"}
    assert lines[2]["retries"] == 1 and lines[2]["upstream"] == f"127.0.0.1:{live}"
    assert [(e.get("attempt"), e["upstream"]) for e in lines[3:]] == [
        (1, f"127.0.0.1:{dead}"), (2, f"127.0.0.1:{dead_too}"), (None, "")]

    # what supervisor trace makes of them (stamped as the supervisor writes them)
    text = (folder / "example.1.sidecar.log").read_text()
    (folder / "example.1.sidecar.log").write_text("".join(STAMP + line + "\n" for line in text.splitlines()))
    assert shape(trace.read(folder, "second-time")) == [
        (0, "example.1.sidecar", "upstream", 0, 200, False),
        (1, "example.1.sidecar", "attempt", 1, 0, True),
        (1, "example.1.sidecar", "attempt", 2, 200, False)]
    assert shape(trace.read(folder, "never")) == [
        (0, "example.1.sidecar", "upstream", 0, 502, False),
        (1, "example.1.sidecar", "attempt", 1, 0, True),
        (1, "example.1.sidecar", "attempt", 2, 0, False)]


# -- the command ---------------------------------------------------------------------------------


def test_the_command_reads_the_state_dirs_logs_without_a_supervisor():
    p = Project("web: python -c pass\n", "[services.web]\nsidecar = false\n")
    try:
        write_logs(p.state_dir / "logs", RETRIED)
        shown = p.cli("trace", RID)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"request {RID}: POST {ITEMS} -> 201") and "status_502, retry" in shown.stdout
        data = json.loads(p.cli("trace", RID, "--json", check=True).stdout)
        assert len(data["hops"]) == 9 and data["request_id"] == RID
        missing = p.cli("trace", "0" * 32)
        assert missing.returncode == 1 and missing.stdout == ""
        assert missing.stderr == f"no log line of request {'0' * 32} in {p.state_dir / 'logs'}\n"
        assert p.cli("trace", "not an id").returncode == 2
    finally:
        p.cleanup()


# -- through the real stack ------------------------------------------------------------------------


def post_item(p: Project, token: str) -> str:
    """Create an item; the response's X-Request-Id."""
    request = urllib.request.Request(p.url + ITEMS, data=b'{"title": "traced"}', method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 201
        return response.headers["X-Request-Id"]


def traced(p: Project, rid: str, kinds: int) -> trace.Trace:
    """The request's trace once `kinds` hops are in the logs (written in batches)."""
    def complete():
        try:
            found = trace.read(p.state_dir / "logs", rid)
        except trace.NotFound:
            return None
        return found if len([h for h in found.hops() if h.kind != "attempt"]) >= kinds else None
    return wait_for(complete, 10, interval=0.1, what=f"the hops of {rid} in the logs")


@pytest.fixture
def stack(agent):
    p = app_stack(agent.address, auth=1)
    p.start(timeout=120)
    yield p
    p.cleanup()


def test_one_request_through_the_stack_and_a_retried_call(stack, agent):
    p = stack
    _, token = user(p, "ada@example.com", "Ada")  # a new owner: example asks auth for her profile
    rid = post_item(p, token)
    traced(p, rid, 6)
    shown = p.cli("trace", rid, "--json", check=True)
    hops = json.loads(shown.stdout)["hops"]
    assert [(h["depth"], h["process"], h["kind"], h["status"]) for h in hops] == [
        (0, "gateway.1", "gateway", 201),
        (1, "example.1.sidecar", "inbound", 201),
        (2, "example.1", "app", 201),
        (3, "example.1.sidecar", "upstream", 200),
        (4, "auth.1.sidecar", "inbound", 200),
        (5, "auth.1", "app", 200),
    ]
    assert hops[0]["path"] == ITEMS and hops[3]["path"].startswith("/api/v1/auth/users/")
    assert '"listener":"app"' in p.log("auth.1") and '"path":"/health"' not in p.log("auth.1"), \
        "the apps log their requests, not their health checks"
    assert hops[0]["target"] == "example.1.sidecar" and hops[3]["target"] == "auth.1.sidecar"
    starts = [h["start_ms"] for h in hops]
    assert starts == sorted(starts), "in time order"
    for parent, child in zip(hops, hops[1:]):  # each inside the one above it
        assert child["start_ms"] + child["duration_ms"] <= parent["start_ms"] + parent["duration_ms"] + 2.0
    text = p.cli("trace", rid, check=True).stdout
    print(text)
    labels = [row.split("|")[-1].strip() for row in text.splitlines()[4:]]
    assert labels == ["gateway.1 gateway -> example.1.sidecar POST /api/v1/example/items",
                      "example.1.sidecar inbound -> example.1", "example.1 app",
                      f"example.1.sidecar upstream -> auth.1.sidecar GET {hops[3]['path']}",
                      "auth.1.sidecar inbound -> auth.1", "auth.1 app"]

    # Two instances of auth that refuse connections (nothing listens at their ports),
    # registered beside the real one: example's sidecar retries its call on another.
    fakes = [free_port(), free_port()]
    for n, port in enumerate(fakes):
        agent.put("/v1/agent/service/register", {"ID": f"auth-refusing-{n}", "Name": "auth", "Address": "127.0.0.1",
                                                 "Port": port, "Connect": {"Native": True}, "Meta": {"instance": "9"}})

    def sees_three():
        changes = [json.loads(line[line.index("{"):]) for line in p.log("example.1.sidecar").splitlines()
                   if '"msg":"upstream instances changed"' in line]
        return changes and len(changes[-1]["instances"]) == 3
    wait_for(sees_three, 10, what="example's sidecar seeing three instances of auth")
    for n in range(8):  # the first pick is a refusing one 2 times in 3
        _, token = user(p, f"owner{n}@example.com", f"Owner {n}")
        rid = post_item(p, token)
        found = traced(p, rid, 6)
        if any(h.attempts for h in found.hops()):
            break
    else:
        pytest.fail("no call to auth was retried in 8 requests")
    (call,) = [h for h in found.hops() if h.attempts]
    assert (call.process, call.kind, call.status) == ("example.1.sidecar", "upstream", 200)
    *failed, last = call.attempts
    assert failed and all(a.retried and a.error == "connect_refused" and a.status == 0 for a in failed)
    assert {a.upstream for a in failed} <= {f"127.0.0.1:{port}" for port in fakes}
    assert (last.target, last.status, last.retried) == ("auth.1.sidecar", 200, False)
    assert [(h.process, h.kind) for h in last.children] == [("auth.1.sidecar", "inbound")]
    assert [(h.process, h.kind) for h in last.children[0].children] == [("auth.1", "app")]
    text = p.cli("trace", rid, check=True).stdout
    print(text)
    assert f"attempt 1 -> {failed[0].upstream} connect_refused, retry" in text
    assert f"attempt {len(failed) + 1} -> auth.1.sidecar\n" in text
    assert text.index("connect_refused, retry") < text.index("auth.1.sidecar inbound") < text.index("auth.1 app")
