"""The network-namespace hosts of tests/netns.py: reachable, isolated, and gone afterwards."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests import netns
from tests.netns import Hosts

PY = sys.executable
pytestmark = pytest.mark.timeout(60)

ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.recv(1024))
"""

# Prints the echo, or why there was none: the caller asserts on one line of output.
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.sendall(b"hello")
        print(c.recv(1024).decode())
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
"""


@pytest.fixture(autouse=True)
def _needs_namespaces():
    if reason := netns.available():
        pytest.skip(reason)


def echo_server(host: netns.Host) -> tuple[subprocess.Popen, int]:
    """An echo server in `host` on its address; the server and its port."""
    proc = host.popen([PY, "-c", ECHO, host.address], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def connect(host: netns.Host, address: str, port: int, timeout: float = 2) -> str:
    """What a client in `host` gets from address:port: the echo, "timeout" or "refused"."""
    done = host.run([PY, "-c", CLIENT, address, str(port), str(timeout)],
                    capture_output=True, text=True, timeout=timeout + 10, check=True)
    return done.stdout.strip()


def echo_from_root(address: str, port: int, timeout: float = 2) -> str:
    with socket.create_connection((address, port), timeout=timeout) as c:
        c.sendall(b"root")
        return c.recv(1024).decode()


def gone(pid: int) -> bool:
    """No such process any more (a zombie waiting for its reaper counts as gone)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


def wait_gone(pids: list[int], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not all(map(gone, pids)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_hosts_reach_each_other_and_have_their_own_loopback():
    with Hosts(2) as hosts:
        one, two = hosts
        assert (one.index, two.index) == (1, 2)
        assert one.address.startswith("198.1") and one.address.endswith(".1")
        assert len(one.name) <= 15 and len(one.veth) <= 15 and len(hosts.bridge) <= 15
        server, port = echo_server(one)
        assert connect(two, one.address, port) == "hello"
        assert echo_from_root(one.address, port) == "root"
        # host 1's 127.0.0.1 is its own: a server on the root namespace's loopback is not there
        with socket.create_server(("127.0.0.1", 0)) as root_server:
            assert connect(one, "127.0.0.1", root_server.getsockname()[1]) == "refused"
        server.kill()
        server.wait()


@pytest.mark.parametrize("body_raises", [False, True])
def test_nothing_is_left_after_the_block(body_raises):
    class Boom(Exception):
        pass

    raises = pytest.raises(Boom) if body_raises else contextlib.nullcontext()
    with raises, Hosts(2) as hosts:
        prefix = hosts.prefix
        assert len(netns.existing()[prefix]) == 5  # bridge, 2 namespaces, 2 veths
        # a child of ours and, through a shell, a process that is not
        shell = hosts[1].popen(["sh", "-c", "sleep 60 & echo $!; wait"],
                               stdout=subprocess.PIPE, text=True)
        grandchild = int(shell.stdout.readline())
        assert sorted(hosts[1].pids()) == sorted([shell.pid, grandchild])
        if body_raises:
            raise Boom
    assert prefix not in netns.existing()
    assert shell.wait(timeout=5) == -9
    assert wait_gone([grandchild])


def test_kill_all_kills_that_host_only():
    with Hosts(2) as hosts:
        one = hosts[0].popen(["sleep", "60"])
        two = hosts[1].popen(["sleep", "60"])
        root = subprocess.Popen(["sleep", "60"])
        try:
            hosts[0].kill_all()
            assert one.wait(timeout=5) == -9
            assert hosts[0].pids() == []
            assert two.poll() is None and root.poll() is None
            assert hosts[1].pids() == [two.pid]
        finally:
            root.kill()
            root.wait()


def test_a_cut_host_is_unreachable_until_restored():
    with Hosts(2) as hosts:
        one, two = hosts
        server, port = echo_server(one)
        assert echo_from_root(one.address, port) == "root"
        one.cut()
        with pytest.raises(TimeoutError):
            echo_from_root(one.address, port, timeout=0.5)
        assert connect(two, one.address, port, timeout=0.5) == "timeout"
        assert server.poll() is None  # the host lives on, cut off
        one.restore()
        assert echo_from_root(one.address, port) == "root"
        assert connect(two, one.address, port) == "hello"


def test_leftovers_of_a_crashed_run_are_removed():
    # The crashed run reports what it made itself: once it is dead, a parallel run's
    # Hosts() may remove its leftovers before this test looks.
    crash = ("from tests.netns import Hosts, existing; import os; h = Hosts(1).__enter__(); "
             "print(h.prefix, len(existing()[h.prefix]), flush=True); os.kill(os.getpid(), 9)")
    done = subprocess.run([PY, "-c", crash], capture_output=True, text=True, timeout=30)
    assert done.returncode == -9, done.stderr
    prefix, made = done.stdout.split()
    assert made == "3"  # bridge, namespace, veth
    netns.remove_leftovers()
    assert prefix not in netns.existing()
    assert not (netns.RUN_DIR / prefix).exists()
