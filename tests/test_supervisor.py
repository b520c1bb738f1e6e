"""The supervisor with small test programs as services (real processes, a real Consul agent)."""

from __future__ import annotations

import os
import re
import signal
import stat
import threading
import time

import psutil
import pytest

from tests.helpers import PROGRAMS, PY, Project, alive, free_range, port_free, wait_for


def project(consul: str, services: dict[str, tuple[str, str]], extra: str = "") -> Project:
    """services: name -> (program flags, extra TOML lines for [services.name])."""
    low, high = free_range(40)
    procfile = "".join(f"{name}: {PY} {PROGRAMS / 'web.py'} {flags}\n" for name, (flags, _) in services.items())
    tables = "".join(f"[services.{name}]\nsidecar = false\n{settings}\n" for name, (_, settings) in services.items())
    config = f"""
[supervisor]
port_range = [{low}, {high}]
stop_timeout = 3.0
start_timeout = 15.0

[restart]
backoff_initial = 0.1
backoff_max = 0.4
max_retries = 3
stable_after = 2.0

[consul]
mode = "external"
address = "{consul}"

[prometheus]
mode = "off"

{extra}
{tables}"""
    return Project(procfile, config)


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


def running(rows):
    return [r for r in rows if r["state"] == "RUNNING"]


def test_start_detach_status_and_stop_leave_nothing(make_project):
    p = make_project({"web": ("--spawn-child", "instances = 2"), "api": ("", "instances = 1")})
    out = p.start()
    assert "web.1" in out.stdout and "RUNNING" in out.stdout
    rows = p.rows()
    assert [(r["service"], r["instance"], r["state"]) for r in rows] == [
        ("api", 1, "RUNNING"), ("web", 1, "RUNNING"), ("web", 2, "RUNNING")]
    ports = [r["port"] for r in rows]
    assert len(set(ports)) == 3, "each instance has its own port"
    table = p.cli("status", check=True).stdout
    for column in ("SERVICE", "INSTANCE", "PID", "STATE", "UPTIME", "RESTARTS", "CPU%", "MEM", "PORT"):
        assert column in table
    # The sampler's figures (every 2 s): memory is the whole tree's, so web's includes the
    # child its app spawned.
    wait_for(lambda: all(r["memory"] > 0 for r in p.rows()), 10, what="a sample of every process")
    web1 = next(r for r in p.rows() if r["process"] == "web.1")
    assert web1["memory"] > psutil.Process(web1["pid"]).memory_info().rss
    # Each instance runs in its own process group; the grandchild came along.
    for r in rows:
        assert os.getpgid(r["pid"]) == r["pid"]
    everything = [proc.pid for proc in p.descendants()]
    assert len(everything) >= 5  # 3 apps + 2 grandchildren
    sup = p.supervisor_pid()

    assert "stopped" in p.cli("stop", check=True).stdout
    wait_for(lambda: not alive(everything + [sup]), 10, what="every process gone")
    assert not (p.state_dir / "run" / "control.sock").exists()


def test_commands_say_plainly_when_no_supervisor_runs(make_project):
    p = make_project({"web": ("", "")})
    for args in (["status"], ["stop"], ["scale", "web=2"], ["restart", "web"]):
        proc = p.cli(*args)
        assert proc.returncode != 0
        assert "not running" in proc.stderr and "Traceback" not in proc.stderr


def test_crash_is_restarted_and_others_are_untouched(make_project):
    p = make_project({"web": ("", "instances = 2")})
    p.start()
    before = {r["instance"]: r["pid"] for r in p.rows("web")}
    os.kill(before[1], signal.SIGKILL)

    def restarted():
        rows = {r["instance"]: r for r in p.rows("web")}
        return rows[1]["state"] == "RUNNING" and rows[1]["pid"] != before[1] and rows
    rows = wait_for(restarted, 10, what="web.1 restarted")
    assert rows[1]["restarts"] == 1
    assert rows[2]["pid"] == before[2] and rows[2]["restarts"] == 0
    assert "restarting in" in p.log("web.1")


def test_crash_loop_ends_fatal_without_burning_cpu(make_project):
    p = make_project({"web": ("", "instances = 1"), "bad": ("--exit-now", "instances = 1")})
    proc = p.cli("start", "--detach", "--wait", "60", timeout=90)
    assert proc.returncode != 0, "start --detach reports the instance that did not come up"
    assert "bad.1 is FATAL" in proc.stderr
    bad = p.rows("bad")[0]
    assert bad["state"] == "FATAL" and bad["pid"] is None
    assert bad["restarts"] == 3 and "exited 3 times" in bad["reason"]
    assert "FATAL" in p.cli("status").stdout
    # The supervisor is idle, and the healthy service keeps running.
    sup = psutil.Process(p.supervisor_pid())
    sup.cpu_percent(None)
    time.sleep(1.0)
    assert sup.cpu_percent(None) < 20
    assert running(p.rows("web"))
    # Restarting it tries again; it fails again, so the command says so.
    again = p.cli("restart", "bad.1")
    assert again.returncode != 0 and "abandoned" in again.stderr


def test_scale_up_down_and_remembered_across_restart(make_project):
    p = make_project({"web": ("", "instances = 1"), "api": ("", "instances = 1")})
    p.start()
    api_pid = p.rows("api")[0]["pid"]
    web1 = p.rows("web")[0]["pid"]
    assert "scaled web=3" in p.cli("scale", "web=3", check=True).stdout
    rows = p.rows("web")
    assert [r["instance"] for r in running(rows)] == [1, 2, 3]
    assert rows[0]["pid"] == web1, "existing instances are untouched"
    gone = [r["pid"] for r in rows[1:]]

    p.cli("scale", "web=1", check=True)
    assert [r["instance"] for r in p.rows("web")] == [1]
    wait_for(lambda: not alive(gone), 5, what="scaled-down instances gone")
    p.cli("scale", "web=2", check=True)
    assert p.rows("api")[0]["pid"] == api_pid

    bad = p.cli("scale", "nope=2")
    assert bad.returncode != 0 and "no service named 'nope'" in bad.stderr
    bad = p.cli("scale", "web=two")
    assert bad.returncode != 0 and "NAME=COUNT" in bad.stderr

    p.cli("stop", check=True)
    p.start()
    assert [r["instance"] for r in running(p.rows("web"))] == [1, 2], "scale survives a restart"


def test_rolling_restart_keeps_instances_up(make_project):
    p = make_project({"web": ("--slow-start 0.5", "instances = 2")})
    p.start()
    before = {r["instance"]: r["pid"] for r in p.rows("web")}
    lowest = [2]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            lowest[0] = min(lowest[0], len(running(p.rows("web"))))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert "restarted web" in p.cli("restart", "web", check=True).stdout
    finally:
        stop.set()
        watcher.join()
    after = {r["instance"]: r["pid"] for r in p.rows("web")}
    assert set(after) == {1, 2}
    assert all(after[i] != before[i] for i in after), "every instance was replaced"
    assert lowest[0] >= 2, "a replacement was up before the old instance stopped"
    assert not alive(before.values())

    one = p.rows("web")[0]["pid"]
    p.cli("restart", "web.2", check=True)
    assert p.rows("web")[0]["pid"] == one
    missing = p.cli("restart", "web.9")
    assert missing.returncode != 0 and "web.9 is not running" in missing.stderr


def test_sigterm_ignored_then_sigkill_after_timeout(make_project):
    p = make_project({"stubborn": ("--ignore-term", "instances = 1\nstop_timeout = 1.0")})
    p.start()
    pid = p.rows("stubborn")[0]["pid"]
    started = time.monotonic()
    p.cli("stop", check=True)
    assert time.monotonic() - started < 8
    assert not alive([pid])
    assert "SIGKILL" in p.log("stubborn.1")


def _watchdog(p: Project) -> psutil.Process:
    return next(proc for proc in p.descendants() if "supervisor.watchdog" in " ".join(proc.cmdline()))


def test_supervisor_killed_leaves_no_orphans(make_project):
    p = make_project({"web": ("--spawn-child", "instances = 2"), "stubborn": ("--ignore-term", "instances = 1")})
    p.start()
    sup = p.supervisor_pid()
    stack = [proc.pid for proc in p.descendants()]
    assert len(stack) >= 6  # 3 apps, 2 grandchildren, the watchdog
    started = time.monotonic()
    os.kill(sup, signal.SIGKILL)
    # Direct children get their parent-death signal; the watchdog takes care of the
    # grandchildren and of the one that ignores SIGTERM.
    wait_for(lambda: not alive(stack), 15, what="every process gone after supervisor SIGKILL")
    print(f"stack gone {time.monotonic() - started:.1f}s after SIGKILL of the supervisor")
    assert "cleaning up" in p.log("supervisor")
    p.start()
    assert len(running(p.rows())) == 3


def test_next_start_cleans_up_when_the_watchdog_died_too(make_project):
    p = make_project({"web": ("--spawn-child", "instances = 1"), "stubborn": ("--ignore-term", "instances = 1")})
    p.start()
    stubborn = p.rows("stubborn")[0]["pid"]
    grandchild = [proc.pid for proc in psutil.Process(p.rows("web")[0]["pid"]).children()]
    os.kill(_watchdog(p).pid, signal.SIGKILL)
    os.kill(p.supervisor_pid(), signal.SIGKILL)
    time.sleep(1.5)
    assert alive([stubborn] + grandchild), "nothing cleaned up yet: these ignore or miss the parent-death signal"
    p.start()
    assert not alive([stubborn] + grandchild)
    assert "leftover" in p.log("supervisor")
    assert len(running(p.rows())) == 2


def test_second_start_refuses_to_run_beside_a_live_supervisor(make_project):
    p = make_project({"web": ("", "")})
    p.start()
    proc = p.cli("start")
    assert proc.returncode != 0 and "already running" in proc.stderr
    assert len(running(p.rows())) == 1


def test_logs_command_shows_and_follows_instance_output(make_project):
    p = make_project({"web": ("", "instances = 2")})
    p.start()
    out = p.cli("logs", "web.1", "-n", "5", check=True).stdout
    assert "web.1" in out and "listening on" in out and "web.2 " not in out
    both = p.cli("logs", "web", check=True).stdout
    assert "web.1" in both and "web.2" in both
    assert p.cli("logs", "nothing").returncode != 0


def test_foreground_start_prints_prefixed_logs_and_ctrl_c_stops_cleanly(make_project):
    import subprocess

    p = make_project({"web": ("--spawn-child", "instances = 2")})
    proc = subprocess.Popen(
        [PY, "-m", "supervisor", "--config", str(p.config_path), "start"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=p.root,
    )
    try:
        wait_for(lambda: (p.state_dir / "run" / "control.sock").exists() and p.status()["supervisor"]["phase"] == "running",
                 30, interval=0.2, what="foreground supervisor running")
        stack = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert not alive(stack)
    lines = out.splitlines()
    assert any(" web.1 " in l and "| web.1: listening on" in l for l in lines)
    assert any("| stopping: received SIGINT" in l for l in lines)
    assert "\033[" not in out, "no colour codes when the output is not a terminal"


def test_a_port_range_among_the_ephemeral_ports_is_warned_about(make_project, tmp_path, monkeypatch):
    from supervisor import ports

    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    (tmp_path / "range").write_text("32768\t60999\n")
    assert ports.ephemeral_overlap(20000, 20999) is None
    assert ports.ephemeral_overlap(32000, 33000) == (32768, 33000)
    assert ports.ephemeral_overlap(60000, 61999) == (60000, 60999)
    monkeypatch.undo()

    low, high = ports.ephemeral_range()
    p = make_project({"web": ("", "")})
    quiet = p.config_path.read_text()
    p.start()
    assert "ephemeral" not in p.log("supervisor"), "the tests' ranges lie below the ephemeral ports"
    p.cli("stop", check=True)
    start = next(s for s in range(low, high - 40, 40) if all(port_free(port) for port in range(s, s + 40)))
    p.config_path.write_text(re.sub(r"port_range = \[\d+, \d+\]", f"port_range = [{start}, {start + 39}]", quiet))
    p.start()
    assert f"overlaps the kernel's ephemeral ports at [{start}, {start + 39}]" in p.log("supervisor")



def test_install_service_writes_a_unit_that_systemctl_stop_stops_cleanly(make_project, tmp_path):
    """The unit `install-service` writes verifies with systemd's own checker, and what
    `systemctl stop` does with it (SIGTERM to ExecStart's process alone: KillMode=mixed)
    stops the stack cleanly. systemd itself is not PID 1 here, so its command is run by hand."""
    import shlex
    import shutil
    import subprocess

    p = make_project({"web": ("", "instances = 2")})
    done = p.cli("install-service", "--unit-dir", str(tmp_path), "--no-enable", check=True)
    unit = next(tmp_path.glob("meshvisor*.service"))
    assert f"wrote {unit}" in done.stdout and stat.S_IMODE(unit.stat().st_mode) == 0o644
    text = unit.read_text()
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert fields["KillMode"] == "mixed" and fields["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert fields["WorkingDirectory"] == str(p.root) and str(p.config_path) in fields["ExecStart"]
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr

    env = {**os.environ, **dict(item.split("=", 1) for item in fields["Environment"].split())}
    proc = subprocess.Popen(shlex.split(fields["ExecStart"]), cwd=fields["WorkingDirectory"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (p.state_dir / "run" / "control.sock").exists() and p.status()["supervisor"]["phase"] == "running",
                 30, interval=0.2, what="the service's supervisor running")
        stack = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(int(fields["TimeoutStopSec"])) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive(stack)
