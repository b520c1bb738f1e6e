"""Sidecars forked from the fork server (sidecar/forkserver.py, supervisor/forkserver.py).

A forked sidecar must be indistinguishable, to the supervisor, from an exec'd one: its
child, in its own session, its output in its log, restarted when it dies, gone when the
supervisor dies; and it must share the fork server's memory (the reason it exists).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from supervisor.forkserver import ForkServer, OrphanReaper, socket_name
from tests.helpers import ROOT, alive, mesh_project, wait_for


def shared_mb(pid: int) -> float:
    kb = {p[0]: int(p[1]) for p in (line.split() for line in open(f"/proc/{pid}/smaps_rollup")) if len(p) == 3}
    return (kb["Shared_Clean:"] + kb["Shared_Dirty:"]) / 1024


def forked(pid: int) -> bool:
    """/proc/PID/environ is what the process was exec'd with: for a forked sidecar, the fork
    server's, without the sidecar's settings (those are in its memory only)."""
    return b"SIDECAR_PORT=" not in open(f"/proc/{pid}/environ", "rb").read()


def sidecar_pids(p) -> dict[str, int]:
    return {r["process"]: r["pid"] for r in p.rows("web") if r["role"] == "sidecar" and r["state"] == "RUNNING"}


def test_forked_sidecars_are_supervised_like_exec_d_ones(agent):
    p = mesh_project(agent.address, {"web": "instances = 3"})
    try:
        p.start()
        supervisor = p.supervisor_pid()
        server = next(r for r in p.rows() if r["process"] == "forkserver")
        assert server["state"] == "RUNNING"
        sidecars = sidecar_pids(p)
        assert len(sidecars) == 3
        for name, pid in sidecars.items():
            proc = psutil.Process(pid)
            assert forked(pid), "forked, not exec'd"
            assert " ".join(proc.cmdline()).startswith(f"sidecar {name.removesuffix('.sidecar')}"), \
                "its title in ps and top"
            assert proc.ppid() == supervisor, "handed to the supervisor (child subreaper), not the fork server's"
            assert os.getsid(pid) == pid and os.getpgid(pid) == pid, "its own session and group"
            # The imports are the fork server's pages: a fresh `python -m sidecar` shares ~1 MB.
            assert shared_mb(pid) > 8, f"{name} shares {shared_mb(pid):.1f} MB"
            assert "registered in Consul" in p.log(name), "its output reaches its log"
        assert len(agent.passing("web")) == 3

        # The fork server dies: the sidecars it forked do not; a sidecar that dies meanwhile
        # comes back (exec'd while the fork server restarts, or forked once it is back).
        os.kill(server["pid"], signal.SIGKILL)
        victim = sidecars["web.1.sidecar"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(sidecar_pids(p)) == 3 and victim not in sidecar_pids(p).values()
                 and len(agent.passing("web")) == 3, 30, what="web.1's sidecar back and passing")
        assert alive([sidecars["web.2.sidecar"], sidecars["web.3.sidecar"]]) == [
            sidecars["web.2.sidecar"], sidecars["web.3.sidecar"]]
        wait_for(lambda: next(r for r in p.rows() if r["process"] == "forkserver")["state"] == "RUNNING", 30,
                 what="the fork server restarted")
        second = sidecar_pids(p)["web.2.sidecar"]
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: sidecar_pids(p).get("web.2.sidecar") not in (None, second)
                 and len(agent.passing("web")) == 3, 30, what="web.2's sidecar back")
        assert forked(sidecar_pids(p)["web.2.sidecar"])

        # A deploy: the sidecar's sources change. The next sidecar started runs them, as an
        # exec'd one would: the fork server is restarted first.
        source = ROOT / "sidecar" / "settings.py"
        before = source.stat()
        server_pid = next(r for r in p.rows() if r["process"] == "forkserver")["pid"]
        try:
            os.utime(source, (before.st_atime, time.time() + 5))
            third = sidecar_pids(p)["web.3.sidecar"]
            os.kill(third, signal.SIGKILL)
            wait_for(lambda: sidecar_pids(p).get("web.3.sidecar") not in (None, third)
                     and len(agent.passing("web")) == 3, 30, what="web.3's sidecar back")
        finally:
            os.utime(source, (before.st_atime, before.st_mtime))
        assert next(r for r in p.rows() if r["process"] == "forkserver")["pid"] != server_pid
        assert "code changed since the fork server imported it" in p.log("forkserver")
        assert forked(sidecar_pids(p)["web.3.sidecar"])

        # The supervisor SIGKILLed: its parent-death signal reaches every forked sidecar.
        everything = list(sidecar_pids(p).values())
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: not alive(everything), 20, what="the forked sidecars to go with the supervisor")
    finally:
        p.cleanup()


def test_fork_server_answers_its_own_user_only():
    if os.getuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root (to connect as another user) and /usr/bin/python3")
    name = socket_name()
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.forkserver", name], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert json.loads(proc.stdout.readline())["msg"] == "serving"
        server = ForkServer()
        server.name = name
        assert server.ask(b"", None, proc.pid) == {"ok": True}
        with pytest.raises(OSError, match="held by pid"):  # not the process we started: told nothing
            server.ask(b"", None, proc.pid + 1)
        # Another user connects: closed without a word.
        probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(chr(0) + sys.argv[1]); "
                 "s.shutdown(socket.SHUT_WR); print(repr(s.recv(100)))")
        # The system's Python: the virtualenv's interpreter may sit where `nobody` cannot go.
        out = subprocess.run(["/usr/bin/python3", "-c", probe, name], user=65534, group=65534, extra_groups=[],
                             capture_output=True, text=True, timeout=10, cwd="/")
        assert out.stdout.strip() == "b''", out
        # A request that is not one: an error, and the server goes on serving.
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect("\0" + name)
            socket.send_fds(conn, [b"{not json"], [os.open(os.devnull, os.O_WRONLY)])
            conn.shutdown(socket.SHUT_WR)
            assert "error" in json.loads(conn.recv(65536))
        assert server.ask(b"", None, proc.pid) == {"ok": True}
    finally:
        proc.kill()
        proc.wait()


def test_orphan_reaper_takes_only_lasting_unsupervised_zombies():
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    orphan, supervised = pids
    wait_for(lambda: all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids), 5)
    reaper = OrphanReaper()
    assert reaper.reap(set(pids), {supervised}) == 0, "a zombie seen once may be a fork being announced"
    assert reaper.reap(set(pids), {supervised}) == 1
    assert not psutil.pid_exists(orphan)
    assert psutil.Process(supervised).status() == psutil.STATUS_ZOMBIE, "its own waiter reaps a supervised one"
    os.waitpid(supervised, 0)
    time.sleep(0)
