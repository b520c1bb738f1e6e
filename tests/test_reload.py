"""`supervisor reload` (and SIGHUP), `supervisor stop NAME` / `start NAME`: real processes.

The plain stacks are tests/test_supervisor.py's (tests/programs/web.py without sidecars,
on the session's Consul agent); the mesh one has sidecars on an ACL agent of its own and
an external PostgreSQL, to see a removed service leave Consul and an added one get its
token, its intentions and its database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import msgspec
import pytest

from supervisor import config as config_mod
from supervisor.reload import plan
from supervisor.service import ServiceGroup
from supervisor.verbs import Gate
from tests.helpers import PROGRAMS, PY, Project, alive, mesh_project, wait_for
from tests.pg import postgres_server  # noqa: F401
from tests.test_supervisor import project


@pytest.fixture
def make_project(consul_agent):
    made = []

    def make(services, extra=""):
        p = project(consul_agent, services, extra)
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def pids(p: Project, service: str) -> dict[int, int]:
    return {r["instance"]: r["pid"] for r in p.rows(service) if r["state"] == "RUNNING"}


def environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# -- the plan: pure, from two loaded configs ----------------------------------------------


def test_plan_names_what_changed_and_refuses_global_keys(tmp_path):
    procfile = tmp_path / "Procfile"
    config = tmp_path / "config" / "meshvisor.toml"
    config.parent.mkdir()

    def load(services: dict[str, str], head: str = "") -> config_mod.Config:
        procfile.write_text("".join(f"{name}: sleep 1\n" for name in services))
        config.write_text(head + "".join(f"[services.{n}]\nsidecar = false\n{t}\n" for n, t in services.items()))
        return config_mod.load(config)

    old = load({"web": "instances = 2", "api": 'env = { A = "1", B = "2" }', "same": "", "gone": ""})
    new = load({"web": "instances = 3", "api": 'env = { A = "1", B = "secret" }\nversion = "2"', "same": "",
                "fresh": ""})
    todo = plan(old, new)
    assert todo.added == ["fresh"] and todo.removed == ["gone"] and todo.unchanged == ["same"]
    assert todo.rescaled == {"web": (2, 3)}
    assert todo.changed == {"api": ["services.api.env.B", "services.api.version"]}, "keys named, never values"
    assert todo.refused == []

    # Global settings resolved into every service: a rolling restart of each, not a refusal.
    timeouts = load({"web": "instances = 2"}, "[supervisor]\nstart_timeout = 5.0\n[restart]\nmax_retries = 2\n")
    todo = plan(load({"web": "instances = 2"}), timeouts)
    assert todo.refused == [] and todo.changed == {
        "web": ["services.web.start_timeout", "services.web.restart.max_retries"]}

    moved = load({"web": "instances = 2"}, '[consul]\naddress = "127.0.0.1:8600"\n[mesh]\nmtls = false\n'
                                           "[supervisor]\nport_range = [30000, 30099]\n")
    assert plan(old, moved).refused == ["supervisor.port_range", "consul.address", "mesh.mtls"]


def test_gate_lets_shared_verbs_overlap_and_an_exclusive_one_wait_for_them():
    async def scenario() -> list[str]:
        gate, seen = Gate(), []

        async def verb(name: str, exclusive: bool, hold: float) -> None:
            async with (gate.exclusive() if exclusive else gate.shared()):
                seen.append(f"{name}+")
                await asyncio.sleep(hold)
                seen.append(f"{name}-")

        first = asyncio.create_task(verb("scale", False, 0.05))
        await asyncio.sleep(0)
        second = asyncio.create_task(verb("restart", False, 0.05))
        await asyncio.sleep(0.01)
        reload = asyncio.create_task(verb("reload", True, 0.02))
        await asyncio.sleep(0)
        late = asyncio.create_task(verb("late", False, 0))  # waits behind the waiting reload
        await asyncio.gather(first, second, reload, late)
        return seen

    seen = asyncio.run(scenario())
    assert seen[:2] == ["scale+", "restart+"], "two shared holders at once"
    assert seen.index("reload+") > max(seen.index("scale-"), seen.index("restart-"))
    assert seen.index("late+") > seen.index("reload-"), "a waiting reload is not starved"


class FakeInstance:
    """What a ServiceGroup asks of an instance, without processes: it fails to start when
    its service's command says so."""

    def __init__(self, service: config_mod.Service, index: int) -> None:
        self.service, self.index, self.running = service, index, False

    @property
    def name(self) -> str:
        return f"{self.service.name}.{self.index}"

    async def start(self, timeout: float) -> str | None:
        self.running = "broken" not in self.service.command
        return None if self.running else f"{self.name} is FATAL: exited 3 times"

    async def stop(self) -> None:
        self.running = False


def test_reconfigure_replaces_every_instance_and_goes_back_to_the_old_settings_when_one_fails(tmp_path):
    (tmp_path / "Procfile").write_text("web: serve\n")
    (tmp_path / "meshvisor.toml").write_text("[services.web]\nsidecar = false\ninstances = 2\n")
    old = config_mod.load(tmp_path / "meshvisor.toml").services["web"]
    env = msgspec.structs.replace(old, env={"GREETING": "hi"})
    broken = msgspec.structs.replace(old, command="broken")

    async def scenario() -> None:
        group = ServiceGroup(old, lambda service, index, generation: FakeInstance(service, index), lambda i: None)
        await group.scale(2)
        first = dict(group.instances)
        assert await group.reconfigure(env, 3) == []
        assert group.service == env and sorted(group.instances) == [1, 2, 3]
        assert all(i.service == env and i.running for i in group.instances.values())
        assert not any(i.running for i in first.values()), "every old instance replaced"

        kept = dict(group.instances)
        problems = await group.reconfigure(broken, 3)
        assert problems == ["restart of web.1 abandoned, the old instance keeps running: web.1 is FATAL: "
                            "exited 3 times; web keeps its old settings for new instances"]
        assert group.service == env and group.instances == kept and all(i.running for i in kept.values())

        with pytest.raises(ValueError):
            group.adopt(msgspec.structs.replace(broken, instances=1))
        group.adopt(msgspec.structs.replace(env, instances=1))
        assert group.service.instances == 1 and group.instances == kept, "adopting a count changes nothing running"

    asyncio.run(scenario())


# -- reload on a running stack --------------------------------------------------------------


def test_reload_scales_restarts_refuses_and_answers_sighup(make_project):
    p = make_project({"web": ("", "instances = 2"), "api": ("", 'instances = 1\nenv = { GREETING = "hello" }')})
    p.start()
    p.cli("scale", "api=2", check=True)  # remembered: the file still says 1
    web, api = pids(p, "web"), pids(p, "api")
    assert len(web) == 2 and len(api) == 2

    # Only `instances` changed: a scale; the kept instances and the other service untouched.
    edit(p.config_path, "instances = 2", "instances = 3")
    started = time.monotonic()
    out = p.cli("reload", check=True).stdout
    print(f"reload (scale web 2 -> 3):\n{out}took {time.monotonic() - started:.1f}s")
    assert "scaled web: instances 2 -> 3 in the file; 3 instances" in out and "unchanged: api" in out
    now = pids(p, "web")
    assert sorted(now) == [1, 2, 3] and {i: now[i] for i in (1, 2)} == web
    assert pids(p, "api") == api, "api's remembered count (2) stays: its instances are unchanged in the file"
    web = now

    # A broken file: the CLI says which key, and nothing changes.
    edit(p.config_path, "instances = 3", "instances = -1")
    bad = p.cli("reload")
    assert bad.returncode == 1 and "services.web.instances: must not be negative" in bad.stderr
    assert "nothing was changed" in bad.stderr and "Traceback" not in bad.stderr
    edit(p.config_path, "instances = -1", "instances = 3")

    # A key only a full restart can apply: refused with its name, even beside a change that
    # alone would be applied.
    address = next(line for line in p.config_path.read_text().splitlines() if line.startswith("address = "))
    edit(p.config_path, address, 'address = "127.0.0.1:1"')
    edit(p.config_path, '"hello"', '"changed"')
    refused = p.cli("reload")
    print(f"reload refused:\n{refused.stderr}")
    assert refused.returncode == 1
    assert "consul.address: changed, and it needs `supervisor stop` + `supervisor start`" in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert pids(p, "web") == web and pids(p, "api") == api
    edit(p.config_path, 'address = "127.0.0.1:1"', address)

    # SIGHUP: the same reload. api's env changed: its instances replaced one at a time
    # (never fewer than 2 running), with the new value; web untouched.
    lowest, watching = [2], threading.Event()

    def watch() -> None:
        while not watching.is_set():
            lowest[0] = min(lowest[0], len(pids(p, "api")))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        os.kill(p.supervisor_pid(), signal.SIGHUP)
        wait_for(lambda: "reload: restarted api" in p.log("supervisor"), 30, what="the reload after SIGHUP")
    finally:
        watching.set()
        watcher.join()
    log = p.log("supervisor")
    assert "received SIGHUP: reloading" in log
    assert "reload: restarted api (env.GREETING changed): 2 instances, one at a time" in log
    now = pids(p, "api")
    assert sorted(now) == [1, 2] and not set(now.values()) & set(api.values()) and not alive(api.values())
    assert all(environ(pid)["GREETING"] == "changed" for pid in now.values())
    assert lowest[0] >= 2, "rolling: each new instance up before its old one stopped"
    assert pids(p, "web") == web

    # A broken file on SIGHUP: the supervisor's log says what is wrong.
    edit(p.config_path, "instances = 3", "instances = -1")
    os.kill(p.supervisor_pid(), signal.SIGHUP)
    wait_for(lambda: "must not be negative; nothing was changed" in p.log("supervisor"), 10, what="refusal logged")
    assert pids(p, "web") == web


def test_stop_and_start_one_service_remembered_across_a_restart_of_the_stack(make_project):
    p = make_project({"web": ("", "instances = 2"), "api": ("", 'instances = 1\nenv = { GREETING = "hello" }')})
    p.start()
    p.cli("scale", "api=2", check=True)
    web, api = pids(p, "web"), pids(p, "api")

    assert p.cli("stop", "api", check=True).stdout.strip() == "stopped api"
    assert not alive(api.values())
    rows = p.rows("api")
    assert [(r["instance"], r["state"], r["pid"]) for r in rows] == [(None, "STOPPED", None)]
    table = p.cli("status", check=True).stdout
    print(table)
    assert any(line.split()[:2] == ["api", "-"] and "STOPPED" in line for line in table.splitlines())
    assert pids(p, "web") == web

    for args in (["stop", "nope"], ["start", "nope"], ["stop", "no/pe"]):
        unknown = p.cli(*args)
        assert unknown.returncode == 1 and unknown.stderr.strip().splitlines() == ["error: no service named "
                                                                                  f"'{args[1]}'"]
    refused = p.cli("scale", "api=3")
    assert refused.returncode == 1 and "api is stopped" in refused.stderr

    # A reload takes its new settings but leaves it stopped.
    edit(p.config_path, '"hello"', '"changed"')
    out = p.cli("reload", check=True).stdout
    assert "api (env.GREETING changed): left stopped" in out
    assert p.rows("api")[0]["state"] == "STOPPED"

    # The whole stack stopped and started: api stays stopped, web runs.
    p.cli("stop", check=True)
    p.start()
    assert p.rows("api")[0]["state"] == "STOPPED" and len(pids(p, "web")) == 2
    web = pids(p, "web")

    assert p.cli("start", "api", check=True).stdout.strip() == "started api"
    now = pids(p, "api")
    assert sorted(now) == [1, 2], "with the count remembered by `supervisor scale`"
    assert all(environ(pid)["GREETING"] == "changed" for pid in now.values())
    assert pids(p, "web") == web
    assert "api" not in (p.state_dir / "stopped.json").read_text()


# -- reload with sidecars, Consul (ACLs) and PostgreSQL ---------------------------------------


def test_reload_adds_and_removes_services_in_consul_with_their_tokens_and_database(agent, postgres_server):
    p = mesh_project(agent.address, {"web": "instances = 2", "api": "instances = 1"})
    try:
        with p.config_path.open("a") as config:
            config.write(f'\n[postgres]\nmode = "external"\ndsn = "{postgres_server.admin_dsn}"\n')
        # Exec'd sidecars: the token is read below from /proc/PID/environ, which a forked
        # sidecar does not have (it holds the fork server's; its own is only in its memory).
        edit(p.config_path, "[supervisor]\n", "[supervisor]\nfork_sidecars = false\n")
        p.start()
        assert len(agent.passing("api")) == 1
        web = {r["process"]: r["pid"] for r in p.rows("web")}

        procfile = p.root / "Procfile"
        edit(procfile, f"api: {PY} {PROGRAMS / 'web.py'}\n", f"extra: {PY} {PROGRAMS / 'web.py'}\n")
        edit(p.config_path, "[services.api]", '[services.extra]\ndatabase = "extra_db"\nupstreams = ["web"]')
        started = time.monotonic()
        out = p.cli("reload", check=True).stdout
        print(f"reload (api removed, extra added):\n{out}took {time.monotonic() - started:.1f}s")
        assert "removed api: its instances deregistered, drained and stopped" in out
        assert "added extra: 1 instance" in out and "unchanged: web" in out

        assert agent.checks("api") == {}, "deregistered, not merely critical"
        assert [s["Meta"]["instance"] for s in agent.passing("extra")] == ["1"]
        assert {r["process"]: r["pid"] for r in p.rows("web")} == web, "web's apps and sidecars untouched"
        assert p.rows("api") == []

        rows = {r["process"]: r for r in p.rows("extra")}
        sidecar_env = environ(rows["extra.1.sidecar"]["pid"])
        assert sidecar_env["CONSUL_HTTP_TOKEN"] not in ("", agent.token), "its own token (ServiceIdentity)"
        assert "/extra_db?" in environ(rows["extra.1"]["pid"])["DATABASE_URL"]
        assert postgres_server.psql("SELECT 1 FROM pg_database WHERE datname = 'extra_db'").strip() == "1"
        intentions = agent.get("/v1/connect/intentions", token=agent.token)
        assert any(i["SourceName"] == "extra" and i["DestinationName"] == "web" and i["Action"] == "allow"
                   for i in intentions)
    finally:
        p.cleanup()
