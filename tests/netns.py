"""Several "hosts" on this one machine for tests: Linux network namespaces on a bridge.

Why: what the mesh does across hosts (a host dying, a cut link, addresses other than
127.0.0.1, a loopback per host) cannot be seen with processes sharing the root namespace.
A network namespace has its own interfaces, loopback and ports, which is all "another
host" means to network code; `with Hosts(3) as hosts:` makes three of them.

Design:
- Names. Each Hosts object draws a prefix `mv` + 6 random hex digits that all it makes
  carries: bridge `<p>br`, namespaces `<p>h<i>`, veth root ends `<p>v<i>` (the other end
  is `eth0` in its namespace). That fits an interface name's 15 characters, and parallel
  or leftover runs never collide.
- Addresses. A random /24 of 198.18.0.0/15 (RFC 2544, reserved for benchmarking) that no
  address or route of this machine overlaps, chosen under a lock so two runs never pick
  the same one. The bridge has .254, so the root namespace has a connected route to the
  hosts; host i has .i. Hosts talk to each other through the bridge (layer 2): nothing is
  forwarded or NATed, and no sysctl, iptables rule or other interface is touched. (With
  bridge-nf-call-iptables=1, bridged frames do pass the root namespace's iptables FORWARD
  chain; a machine whose FORWARD drops them fails host-to-host connects, loudly.)
- Ownership. Before making anything, the creator writes /run/meshvisor-netns/<prefix>
  holding its pid and start time, and it removes that file last. remove_leftovers()
  deletes everything under a prefix whose file is missing or whose creator is gone (a
  reused pid has another start time). /run is cleared at boot, as namespaces are.
- Cleanup. SIGKILL every process in each namespace (a namespace lives on while a process
  is in it), delete the veths, namespaces and bridge: on leaving the `with` block, raised
  or not, and at interpreter exit as a safety net.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

IP = shutil.which("ip") or "/usr/sbin/ip"
RUN_DIR = Path("/run/meshvisor-netns")
RANGE = ipaddress.ip_network("198.18.0.0/15")
NAME = re.compile(r"(mv[0-9a-f]{6})(?:br|v\d+|h\d+)")
PREFIX = re.compile(r"mv[0-9a-f]{6}")
Argv = Sequence[str | os.PathLike[str]]


def _ip(*args: str, check: bool = True) -> str:
    """Run one `ip` command and return its stdout; a failure raises with ip's own words."""
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    """`ip -j ...` parsed (ip prints nothing at all for some empty lists)."""
    return json.loads(_ip("-j", *args) or "[]")


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot): tells a pid from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Between processes: choosing a subnet and removing leftovers must not interleave."""
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(RUN_DIR / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def existing() -> dict[str, list[str]]:
    """{prefix: names of its namespaces and root-namespace links} as they are now."""
    found: dict[str, list[str]] = {}
    names = [n["name"] for n in _ip_json("netns", "list")]
    names += [link["ifname"] for link in _ip_json("link", "show")]
    for name in names:
        if m := NAME.fullmatch(name):
            found.setdefault(m.group(1), []).append(name)
    return found


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in `ns` until none is left: one may fork while we kill."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _remove(prefix: str, names: Sequence[str]) -> None:
    """Delete a prefix's objects: processes first (they hold namespaces), bridge last."""
    namespaces = [n for n in names if n.startswith(f"{prefix}h")]
    for ns in namespaces:
        _kill_namespace(ns)
    for veth in (n for n in names if n.startswith(f"{prefix}v")):
        _ip("link", "del", veth, check=False)  # takes its peer in the namespace with it
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", f"{prefix}br", check=False)
    (RUN_DIR / prefix).unlink(missing_ok=True)


def _creator_alive(prefix: str) -> bool:
    """Whether the process that recorded `prefix` still runs (no record: it is gone)."""
    try:
        pid, started = (RUN_DIR / prefix).read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == started


def remove_leftovers() -> list[str]:
    """Remove what crashed runs left behind; returns the prefixes removed."""
    removed = []
    with _locked():
        found = existing()
        records = {r.name for r in RUN_DIR.iterdir() if PREFIX.fullmatch(r.name)}
        for prefix in sorted(records | set(found)):
            if not _creator_alive(prefix):
                _remove(prefix, found.get(prefix, []))
                removed.append(prefix)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 of RANGE that no address or route of the root namespace overlaps.

    Routes as wide as RANGE or wider (the default route) do not count: our connected /24
    is more specific and wins.
    """
    used = [ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            for link in _ip_json("-4", "addr", "show") for a in link.get("addr_info", [])]
    used += [ipaddress.ip_network(r["dst"], strict=False)
             for r in _ip_json("-4", "route", "show", "table", "all") if r["dst"] != "default"]
    used = [net for net in used if net.prefixlen > RANGE.prefixlen]
    free = [net for net in RANGE.subnets(new_prefix=24) if not any(net.overlaps(u) for u in used)]
    if not free:
        raise RuntimeError(f"no free /24 left in {RANGE}")
    return random.choice(free)


class Host:
    """One namespace on the bridge: a host of its own, as far as the network goes."""

    def __init__(self, prefix: str, index: int, address: str) -> None:
        self.index = index
        self.name = f"{prefix}h{index}"
        self.address = address
        self.veth = f"{prefix}v{index}"

    def _argv(self, argv: Argv) -> list[str]:
        # `ip netns exec` execs the program itself: Popen.pid and its signals reach it.
        return [IP, "netns", "exec", self.name, *map(os.fspath, argv)]

    def popen(self, argv: Argv, **kwargs: Any) -> subprocess.Popen:
        """subprocess.Popen, inside this host."""
        return subprocess.Popen(self._argv(argv), **kwargs)

    def run(self, argv: Argv, **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run, inside this host."""
        return subprocess.run(self._argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process in this host's namespace, children of ours or not."""
        return [int(p) for p in _ip("netns", "pids", self.name).split()]

    def kill_all(self) -> None:
        """SIGKILL everything in this host: the host dies, its network stays."""
        _kill_namespace(self.name)

    def cut(self) -> None:
        """Cut the link: down goes the bridge's end, so the host keeps its address and
        routes and its packets just go nowhere (connects time out, as with a pulled cable,
        rather than failing at once)."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        """Plug the link back in (the bridge port forwards at once: no STP, no delay)."""
        _ip("link", "set", self.veth, "up")


class Hosts:
    """`count` hosts on one bridge; `with Hosts(n) as hosts:` then hosts[0] is host .1."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= 253:
            raise ValueError("count must be 1..253 (one /24, .254 is the bridge)")
        self.count = count
        self.prefix = "mv" + secrets.token_hex(3)
        self.bridge = f"{self.prefix}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge_address = ""  # the root namespace's own address on the bridge (.254)
        self.hosts: list[Host] = []
        self._made: list[str] = []
        self._open = False

    def __enter__(self) -> Hosts:
        remove_leftovers()
        self._open = True
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def _create(self) -> None:
        with _locked():  # the record first, and no other run picks the subnet meanwhile
            pid = os.getpid()
            (RUN_DIR / self.prefix).write_text(f"{pid} {_start_time(pid)}\n")
            self.subnet = _free_subnet()
            self.bridge_address = str(self.subnet[254])
            self._made.append(self.bridge)
            _ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index in range(1, self.count + 1):
            host = Host(self.prefix, index, str(self.subnet[index]))
            self._made += [host.name, host.veth]
            _ip("netns", "add", host.name)
            _ip("link", "add", host.veth, "type", "veth",
                "peer", "name", "eth0", "netns", host.name)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            self.hosts.append(host)

    def close(self) -> None:
        """Kill every process in the hosts and delete everything made (idempotent)."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.close)
        _remove(self.prefix, self._made)


@functools.cache
def available() -> str | None:
    """None when hosts can be made here, else why not (for pytest.skip). Tried for real,
    once per process: a container lacking rights or modules fails only when it tries."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.access(IP, os.X_OK):
        return "no `ip` binary (iproute2)"
    try:
        with Hosts(1) as hosts:
            hosts[0].run(["true"], check=True, capture_output=True, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"cannot make network namespaces here: {exc}"
    return None
