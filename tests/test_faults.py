"""Proof under faults: the whole stack (gateway, auth x2, example x3, sidecars) started by
the supervisor, a bounded mixed load through the gateway, one fault at a time; asserts on
what clients saw and on the data. Each test prints its figures for the CI log.

Tests 1-6 share one stack (on this module's own Consul agent and PostgreSQL server, which
they stop and start); each leaves it as it found it: 3 example instances passing. The
supervisor-kill and crash-loop tests run stacks of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import psutil
import pytest

from tests.figures import figure
from tests.helpers import PY, alive, wait_for
from tests.load import ITEMS, Load, LoadResult
from tests.pg import PostgresServer
from tests.stack import app_stack, call, shaped, user

EXAMPLE = 3


@pytest.fixture(scope="module")
def consul(acl_agents):
    agent = acl_agents.take()  # conftest.AclAgents: started ahead
    yield agent
    acl_agents.give_back(agent)


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        server.setup()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def stack(consul, postgres):
    p = app_stack(consul.address, auth=2, example=EXAMPLE, postgres_dsn=postgres.admin_dsn)
    try:
        p.start(timeout=120)
        _, p.token = user(p, "load@example.com", "Load")
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def steady(stack, consul):
    """The shared stack, checked healthy before the test and left healthy after it."""
    settle(stack, consul)
    yield stack
    settle(stack, consul)


def settle(p, consul, example: int = EXAMPLE, timeout: float = 30) -> None:
    wait_for(lambda: _safe(lambda: len(consul.passing("example")) == example and len(consul.passing("auth")) == 2),
             timeout, what=f"{example} example and 2 auth instances passing")
    wait_for(lambda: gateway_instances(p) == example, timeout, what="the gateway to route to every instance")


def gateway_instances(p, prefix: str = "/api/v1/example") -> int:
    status, health = call(p, "GET", "/health")
    return health["routes"].get(prefix, {}).get("instances", 0) if status == 200 else -1


def _safe(check) -> bool:
    try:
        return bool(check())
    except OSError:
        return False


def gateway_retries(p) -> int:
    """Requests the gateway resent to another instance so far (its /metrics)."""
    with urllib.request.urlopen(p.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("gateway_retries_total{") or line.startswith("gateway_retries{"))


def rows(p, service: str, role: str) -> list[dict]:
    return [r for r in p.rows(service) if r["role"] == role]


def stored(postgres: PostgresServer, ids) -> set[str]:
    """Which of `ids` are rows of the example database (asked as the superuser)."""
    ids = list(ids)
    if not ids:
        return set()
    found = postgres.psql(f"SELECT id FROM items WHERE id IN ({', '.join(repr(i) for i in ids)})", "example")
    return set(found.split())


def duplicates(postgres: PostgresServer) -> int:
    """Titles of the load (each unique) stored more than once: a resent write acted twice."""
    return int(postgres.psql("SELECT count(*) FROM (SELECT title FROM items WHERE title LIKE 'load %' "
                             "GROUP BY title HAVING count(*) > 1) d", "example"))


def report(name: str, result: LoadResult, p=None, allowed: tuple[int, ...] = (), **figures) -> None:
    extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in figures.items())
    figure(f"[fault] {name}: {result.summary()}, failed {len(result.failed(allowed))}{extra}")
    if p is not None:
        explain(p, result.failed(allowed)[:5])


def _brief(line: str) -> str:
    """A log line with a traceback cut to its message and last frames."""
    try:
        record = json.loads(line[line.index("{"):])
    except ValueError:
        return line[:500]
    trace = record.pop("exception", "")
    return json.dumps(record)[:400] + ("\n      " + "\n      ".join(trace.splitlines()[-4:]) if trace else "")


def explain(p, outcomes) -> None:
    """Print every log line that mentions the request id of a failed answer (for CI)."""
    logs = sorted((p.state_dir / "logs").glob("*.log"))
    for o in outcomes:
        rid = (o.body or {}).get("request_id")
        print(f"  failed: {o.method} {o.path} -> {o.status} {o.body}")
        if not rid:
            continue
        for path in logs:
            for line in path.read_text(errors="replace").splitlines():
                if rid in line:
                    print(f"    {path.name}: {_brief(line)}")


def _kill_one(p, consul, role: str) -> tuple[LoadResult, float, float]:
    """kill -9 the `role` process of example.2 under load; (the load's result, seconds
    until the process was restarted and the instance passing in Consul again, seconds
    until the gateway routed to all instances again)."""
    with Load(p.url, p.token).start() as load:
        load.run_for(2)
        victim = next(r for r in rows(p, "example", role) if r["process"].startswith("example.2"))
        service_id = next(s["ID"] for s in consul.passing("example") if s["Meta"]["instance"] == "2")
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        # Back means: the supervisor runs a new process (for an app, only once it answers),
        # and after that Consul reports the instance passing (a dead app's check went
        # critical at once; a dead sidecar's registration is made anew by its replacement).
        restarted = passing = routed = None
        deadline = killed + 15
        while time.monotonic() < deadline and routed is None:
            if restarted is None:
                row = next((r for r in rows(p, "example", role) if r["process"] == victim["process"]), {})
                if row.get("state") == "RUNNING" and row.get("pid") not in (None, victim["pid"]):
                    restarted = time.monotonic() - killed
            elif passing is None and _safe(lambda: service_id in {s["ID"] for s in consul.passing("example")}):
                passing = time.monotonic() - killed
            if passing is not None and gateway_instances(p) == EXAMPLE:
                routed = time.monotonic() - killed
            time.sleep(0.05)
        assert passing is not None and passing <= 10, f"{victim['process']} not back and passing within 10 s"
        assert routed is not None, "the gateway does not route to the instance again"
        load.run_for(2)
        return load.stop(), passing, routed


@pytest.mark.parametrize("role", ["app", "sidecar"])
def test_1_2_kill_one_app_or_sidecar_of_three(steady, consul, postgres, role):
    retries = gateway_retries(steady)
    result, passing, routed = _kill_one(steady, consul, role)
    report(f"kill -9 one example {role} of 3", result, back_passing_in_consul=f"{passing:.1f}s",
           routed_again=f"{routed:.1f}s", gateway_retries=gateway_retries(steady) - retries,
           duplicates=duplicates(postgres))
    assert not result.failed(), result.failed()[:5]
    assert result.writes > 50
    assert stored(postgres, result.created) == set(result.created)
    assert duplicates(postgres) == 0


def test_3_rolling_restart_under_load(steady, postgres):
    p = steady
    old = {r["pid"] for r in rows(p, "example", "app")}
    with Load(p.url, p.token).start() as load:
        load.run_for(1)
        began = time.monotonic()
        p.cli("restart", "example", check=True)
        took = time.monotonic() - began
        load.run_for(2)
        result = load.stop()
    new = {r["pid"] for r in rows(p, "example", "app")}
    report("supervisor restart example (rolling, 3 instances)", result, restart_took=f"{took:.1f}s")
    assert not result.failed(), result.failed()[:5]
    assert len(new) == EXAMPLE and not old & new
    assert stored(postgres, result.created) == set(result.created)


def test_4_scale_down_to_one_then_up_to_four_under_load(steady, consul, postgres):
    p = steady
    try:
        with Load(p.url, p.token).start() as load:
            load.run_for(1)
            p.cli("scale", "example=1", check=True)
            wait_for(lambda: gateway_instances(p) == 1, 10, what="the gateway to see 1 instance")
            load.run_for(2)
            began = time.monotonic()
            p.cli("scale", "example=4", check=True)  # returns once the new instances pass
            scaled = time.monotonic() - began
            wait_for(lambda: gateway_instances(p) == 4, 15, what="the gateway to route to 4 instances")
            routed = time.monotonic() - began
            before = {r["process"]: served(p, r["process"]) for r in rows(p, "example", "sidecar")}
            load.run_for(3)
            result = load.stop()
        after = {r["process"]: served(p, r["process"]) for r in rows(p, "example", "sidecar")}
    finally:
        p.cli("scale", f"example={EXAMPLE}", check=True)  # the next test expects the usual stack
    gained = {name: after.get(name, 0) - before.get(name, 0) for name in before}
    new = sorted(gained)[1:]  # the instance that stayed is example.1
    report("scale example 3 -> 1 -> 4 under load", result, scale_to_4_returned_after=f"{scaled:.1f}s",
           routed_to_4_after=f"{routed:.1f}s",
           requests_per_instance_after_scale_up=gained)
    assert not result.failed(), result.failed()[:5]
    assert len(new) == 3 and all(gained[name] > 0 for name in new), gained
    assert stored(postgres, result.created) == set(result.created)


def served(p, sidecar_process: str) -> int:
    """Requests of the load a sidecar has relayed to its app: inbound access-log lines for
    the items (not the health checks, nor calls through its upstream listeners)."""
    count = 0
    for line in p.log(sidecar_process).splitlines():
        if '"msg":"request"' not in line:
            continue
        record = json.loads(line[line.index("{"):])
        count += record.get("listener") == "inbound" and record.get("path", "").startswith(ITEMS)
    return count


def test_5_consul_stopped_for_10s(steady, consul, postgres):
    p = steady
    with Load(p.url, p.token).start() as load:
        load.run_for(1)
        consul.stop()
        try:
            load.run_for(8)
            # Every sidecar keeps its last good leaf and roots (mTLS goes on) and says so.
            shown = p.cli("status", check=True).stdout
            load.run_for(2)
        finally:
            consul.start()
        restarted = time.monotonic()
        assert re.search(r"sidecar: identity: .*the last good certificate is kept", shown), shown
        # The agent comes back with its state (a server keeps it in its data dir): the
        # sidecars' anti-entropy makes sure every registration is there and passing.
        wait_for(lambda: _safe(lambda: len(consul.passing("example")) == EXAMPLE and len(consul.passing("auth")) == 2
                               and consul.passing("gateway")), 10, interval=0.1,
                 what="every registration back after the Consul restart")
        back = time.monotonic() - restarted
        load.run_for(3)
        result = load.stop()
    report("Consul agent stopped 10 s, then started", result,
           every_registration_back_after=f"{back:.1f}s")
    assert not result.failed(), result.failed()[:5]
    assert stored(postgres, result.created) == set(result.created)


def test_6_postgres_stopped(steady, postgres):
    p = steady

    def writes_again() -> bool:
        status, _ = call(p, "POST", ITEMS, {"title": "after the outage"}, token=p.token)
        return status == 201

    with Load(p.url, p.token, timeout=15).start() as load:
        load.run_for(2)
        postgres.stop()
        stopped = time.monotonic()
        at_stop = load.count()
        try:
            load.run_for(4)
        finally:
            postgres.start()
        during = load.count() - at_stop
        back = time.monotonic()
        wait_for(writes_again, 20, interval=0.1, what="writes to succeed again")
        recovered = time.monotonic() - back
        load.run_for(2)
        result = load.stop()
    unavailable = result.with_status(503)
    report("PostgreSQL stopped 4 s", result, p, (503,), answered_during_outage=during, answered_503=len(unavailable),
           writes_ok_again_after_restart=f"{recovered:.2f}s",
           outage=f"{back - stopped:.1f}s")
    assert not result.failed(allowed=(503,)), result.failed(allowed=(503,))[:5]
    assert unavailable, "the outage was seen by clients"
    for o in unavailable:
        assert o.body and o.body["status"] == 503 and {"error", "message", "request_id"} <= set(o.body), o
        assert o.seconds < 12, f"a 503 took {o.seconds:.1f}s"
    assert stored(postgres, result.created) == set(result.created), "every acknowledged write is stored"


# -- stacks of their own


@pytest.fixture
def agent_address(consul_agent):
    return consul_agent


def test_7_supervisor_sigkill_then_start_again_keeps_the_data(agent_address):
    p = app_stack(agent_address, auth=1, example=2)
    try:
        p.start(timeout=120)
        _, token = user(p, "kill@example.com", "Kill")
        with Load(p.url, token, rate=80, workers=4).start() as load:
            load.run_for(3)
            result = load.stop()
        assert not result.failed() and result.created
        stack_pids = [proc.pid for proc in p.descendants()]
        supervisor = p.supervisor_pid()
        os.kill(supervisor, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not alive(stack_pids), 15, interval=0.1, what="every process of the stack to exit")
        gone = time.monotonic() - killed
        began = time.monotonic()
        p.start(timeout=120)
        restarted = time.monotonic() - began
        kept = [item_id for item_id in result.created
                if call(p, "GET", f"/api/v1/example/items/{item_id}")[0] == 200]
        status, page = call(p, "GET", "/api/v1/example/items?limit=1")
        figure(f"[fault] supervisor SIGKILL: {len(stack_pids)} processes gone after {gone:.1f}s; "
              f"start again took {restarted:.1f}s; {len(kept)}/{len(result.created)} acknowledged items found, "
              f"{page['total']} in all")
        assert len(kept) == len(result.created)
        _, fresh = call(p, "POST", "/api/v1/auth/login", {"email": "kill@example.com", "password": "long password"})
        assert "access_token" in fresh, "the user survived too"
    finally:
        p.cleanup()


def test_8_app_exiting_at_once_ends_fatal_and_the_rest_keeps_serving(agent_address):
    p = app_stack(agent_address, auth=1, example=1,
                  extra_procfile=f"broken: {PY} -c 'import sys; sys.exit(3)'\n",
                  extra_config="\n[services.broken]\nsidecar = false\nready = \"process\"\n"
                               "restart = { backoff_initial = 0.1, backoff_max = 0.2, max_retries = 3 }\n")
    try:
        began = time.monotonic()
        p.cli("start", "--detach", "--wait", "60", timeout=120)  # exits non-zero: broken never starts
        wait_for(lambda: _safe(lambda: p.rows("broken")[0]["state"] == "FATAL"), 30, what="broken to be FATAL")
        fatal = time.monotonic() - began
        row = p.rows("broken")[0]
        _, token = user(p, "fatal@example.com", "Fatal")
        with Load(p.url, token, rate=80, workers=4).start() as load:
            load.run_for(3)
            result = load.stop()
        figure(f"[fault] app exiting at once: FATAL {fatal:.1f}s after start ({row.get('reason', '')}); "
              f"the rest: {result.summary()}, failed {len(result.failed())}")
        assert not result.failed() and result.sent > 100
        assert all(r["state"] == "RUNNING" for r in p.rows() if r["service"] != "broken")
        status = p.cli("status").stdout
        assert "FATAL" in status
    finally:
        p.cleanup()
