"""One supervised OS process: spawn, restart with backoff, stop its whole tree, stats.

Every process gets its own process group (so a stop reaches whatever it forked), a
parent-death signal (so it does not outlive a supervisor killed with SIGKILL) and its
open-files soft limit raised to the hard one (systemd's LimitNOFILE: a gateway with
thousands of clients needs more than the usual soft 1024; the hard limit stays the
operator's ceiling). The supervisor raises its own once at start too.
"""

from __future__ import annotations

import asyncio
import enum
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from shared.backoff import CrashBackoff
from shared.procctl import die_with_parent
from supervisor.config import RestartPolicy
from supervisor.logs import ProcessLog



class State(str, enum.Enum):
    STARTING = "STARTING"  # spawned, not yet ready
    RUNNING = "RUNNING"  # ready
    BACKOFF = "BACKOFF"  # exited, waiting to be restarted
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FATAL = "FATAL"  # gave up after too many quick exits


@dataclass
class ProcessSpec:
    name: str  # e.g. "auth.1" or "consul"
    argv: list[str]
    env: dict[str, str]
    cwd: str
    restart: RestartPolicy
    stop_timeout: float = 10.0
    stop_signal: int = signal.SIGTERM
    # Sent by the kernel when the supervisor dies, whatever the way.
    parent_death_signal: int = signal.SIGTERM
    user: int | None = None  # run as this uid/gid (root supervisor running PostgreSQL)
    group: int | None = None
    port: int | None = None  # shown in status
    # Resolves once the process serves; None means "alive for a second".
    ready_check: Callable[[], Awaitable[bool]] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # Asks another process for this one as a fork (sidecars: supervisor/forkserver.py);
    # returns None (or raises OSError) when it cannot, and then the argv is exec'd.
    fork: Callable[[ProcessSpec], Awaitable[Any]] | None = None


def raise_open_files_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE's soft limit up to its hard one; returns (soft, hard) as they are now.

    Raising the soft limit up to the hard one needs no privilege. Left as it was if the
    kernel refuses (e.g. a hard limit of "unlimited" above fs.nr_open).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft, hard


def _child_setup(parent_pid: int, death_signal: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child after setsid/setuid (credential changes clear the setting).
        if not die_with_parent(death_signal, parent_pid):  # the parent died before it took effect
            os._exit(1)
        raise_open_files_limit()

    return setup


class Process:
    def __init__(
        self,
        spec: ProcessSpec,
        log: ProcessLog,
        on_spawn: Callable[[Process], None] | None = None,
        on_exit: Callable[[Process], None] | None = None,
    ) -> None:
        self.spec = spec
        self.log = log
        self.state = State.STOPPED
        self.pid: int | None = None
        self.started_at: float | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.reason = ""
        policy = spec.restart
        self._backoff = CrashBackoff(policy.backoff_initial, policy.backoff_max, policy.max_retries,
                                     policy.stable_after)
        self._on_spawn = on_spawn
        self._on_exit = on_exit
        # Called with this process when it exits (not when we stop it): the instance
        # uses it to tell the sidecar that its app died.
        self.exit_listeners: list[Callable[[Process], None]] = []
        # Called with this process each time it is spawned (the fork server notes what
        # code it imports).
        self.spawn_listeners: list[Callable[[Process], None]] = []
        self._proc: Any = None  # asyncio's subprocess.Process, or a ForkedChild (same four members)
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._settled = asyncio.Event()  # set on RUNNING or FATAL: "start is decided"
        self._ps: psutil.Process | None = None
        self._cpu_ticks: dict[int, int] = {}  # pid -> CPU time at the last sample (its tree)
        self._sampled_at = 0.0
        self.cpu_percent = 0.0
        self.memory = 0

    @property
    def name(self) -> str:
        return self.spec.name

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._settled.clear()
            self._backoff.reset()
            self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def wait_settled(self, timeout: float) -> bool:
        """Wait until the process is ready (True) or FATAL / timed out (False)."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return self.state == State.RUNNING

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (or the spec's stop signal) to the group, SIGKILL after the timeout."""
        self._stopping = True
        self._wake.set()
        if self._proc is not None and self._proc.returncode is None:
            self.state = State.STOPPING
            await self._terminate(self.spec.stop_timeout if timeout is None else timeout)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = State.STOPPED
        self.pid = None

    def send_signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                os.kill(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill_now(self) -> None:
        """Last resort on a forced shutdown: SIGKILL the group without waiting."""
        self._stopping = True
        self._wake.set()
        if self.pid is not None:
            _signal_tree(self.pid, self._tree(), signal.SIGKILL)

    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await self._spawn()
            except OSError as exc:
                self.log.write(f"[meshvisor] cannot start {self.spec.argv[0]}: {exc}".encode())
                ran_for = 0.0
                self.last_exit = None
            else:
                ran_for = await self._wait_exit()
            if self._stopping:
                break
            delay = self._backoff.record_exit(ran_for)
            if delay is None:
                self.state = State.FATAL
                self.reason = (
                    f"exited {self._backoff.failures - 1} times within "
                    f"{self.spec.restart.stable_after:g}s of starting (last exit {self._exit_text()})"
                )
                self.log.write(f"[meshvisor] FATAL: {self.reason}; not restarting".encode())
                self._settled.set()
                return
            self.state = State.BACKOFF
            self.log.write(
                f"[meshvisor] exited ({self._exit_text()}) after {ran_for:.1f}s; restarting in {delay:g}s".encode()
            )
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            if not self._stopping:
                self.restarts += 1

    async def _spawn(self) -> None:
        spec = self.spec
        self._ready.clear()
        self.reason = ""
        self._proc = None
        if spec.fork is not None:
            try:
                self._proc = await spec.fork(spec)
            except OSError as exc:
                self.log.write(f"[meshvisor] not forked ({exc}): exec'ing {spec.argv[0]} instead".encode())
        if self._proc is None:
            self._proc = await self._exec(spec)
        self.pid = self._proc.pid
        self.started_at = time.time()
        self.state = State.STARTING
        try:
            self._ps = psutil.Process(self.pid)
        except psutil.Error:
            self._ps = None
        self._cpu_ticks = {}
        if self._on_spawn:
            self._on_spawn(self)
        for listener in self.spawn_listeners:
            listener(self)

    @staticmethod
    async def _exec(spec: ProcessSpec) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=spec.env,
            cwd=spec.cwd,
            start_new_session=True,
            user=spec.user,
            group=spec.group,
            extra_groups=[] if spec.user is not None else None,
            preexec_fn=_child_setup(os.getpid(), spec.parent_death_signal),
            limit=1 << 20,
        )

    async def _wait_exit(self) -> float:
        assert self._proc is not None
        proc = self._proc
        reader = asyncio.create_task(self._pump_output(proc.stdout))
        readiness = asyncio.create_task(self._become_ready())
        await proc.wait()
        readiness.cancel()
        # A grandchild may still hold the pipe: give the reader a moment, not forever.
        try:
            await asyncio.wait_for(reader, 1.0)
        except asyncio.TimeoutError:
            pass
        self.last_exit = proc.returncode
        ran_for = time.time() - (self.started_at or time.time())
        # Whatever it left behind in its group goes with it.
        _signal_group(proc.pid, signal.SIGKILL)
        if self._on_exit:
            self._on_exit(self)
        if not self._stopping:
            for listener in self.exit_listeners:
                listener(self)
        self._ready.clear()
        return ran_for

    async def _become_ready(self) -> None:
        check = self.spec.ready_check
        if check is None:
            await asyncio.sleep(min(1.0, self.spec.restart.stable_after))
        else:
            while not await _safe(check):
                await asyncio.sleep(0.1)
        if self._proc is not None and self._proc.returncode is None and not self._stopping:
            self.state = State.RUNNING
            self._ready.set()
            self._settled.set()

    async def _pump_output(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines:
                self.log.write_lines(lines)
            if len(pending) > 65536:  # no newline in sight: flush what we have
                self.log.write(pending)
                pending = b""
        if pending:
            self.log.write(pending)

    async def _terminate(self, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        tree = self._tree()
        _signal_group(proc.pid, self.spec.stop_signal)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.log.write(f"[meshvisor] still running after {timeout:g}s: SIGKILL".encode())
            _signal_tree(proc.pid, tree, signal.SIGKILL)
            await proc.wait()
        # Children that left the group or ignored the signal do not survive the stop.
        _, alive = psutil.wait_procs(tree, timeout=0.5 if tree else 0)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass

    def _tree(self) -> list[psutil.Process]:
        if self._ps is None:
            return []
        try:
            return self._ps.children(recursive=True)
        except psutil.Error:
            return []

    def _exit_text(self) -> str:
        code = self.last_exit
        if code is None:
            return "did not start"
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"code {code}"

    # -- observation ---------------------------------------------------------------

    def sample(self, table: ProcessTable) -> None:
        """Refresh CPU % (since the last sample) and memory (RSS) of the process and its
        descendants, from a ProcessTable read once per pass for every process: asking
        psutil for each process's children and figures read every /proc entry per
        process, which made the supervisor's sampling quadratic in the instances."""
        if self.pid is None or self.state in (State.STOPPED, State.FATAL):
            self.cpu_percent, self.memory, self._cpu_ticks = 0.0, 0, {}
            return
        ticks, memory, pending = {}, 0, [self.pid]
        while pending:
            pid = pending.pop()
            stat = table.stats.get(pid)
            if stat is None:
                continue
            pending += table.children_of.get(pid, ())
            ticks[pid] = stat.cpu_ticks
            memory += stat.rss
        spent = sum(ticks[pid] - self._cpu_ticks[pid] for pid in ticks if pid in self._cpu_ticks)
        elapsed = table.read_at - self._sampled_at
        self.cpu_percent = 100.0 * spent / _CLOCK_TICKS / elapsed if self._cpu_ticks and elapsed > 0 else 0.0
        self.memory, self._cpu_ticks, self._sampled_at = memory, ticks, table.read_at

    def status(self) -> dict:
        alive = self.state not in (State.STOPPED, State.FATAL, State.BACKOFF)
        return {
            "process": self.name,
            "pid": self.pid if alive else None,
            "state": self.state.value,
            "uptime": (time.time() - self.started_at) if alive and self.started_at else None,
            "restarts": self.restarts,
            "cpu_percent": round(self.cpu_percent, 1),
            "memory": self.memory,
            "port": self.spec.port,
            "role": self.spec.tags.get("role", ""),
            "reason": self.reason,
        }


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ProcStat:
    ppid: int
    zombie: bool
    cpu_ticks: int  # user + system
    rss: int  # bytes


def read_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat, the one file with all we sample (psutil reads it and more, per call)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # After "pid (comm) " -- comm may hold spaces and parentheses, so split after the last ")".
    fields = data[data.rindex(b")") + 2:].split()
    return ProcStat(ppid=int(fields[1]), zombie=fields[0] == b"Z", cpu_ticks=int(fields[11]) + int(fields[12]),
                    rss=int(fields[21]) * _PAGE)


@dataclass
class ProcessTable:
    """Every process on the machine (its parent, state, CPU time, RSS) from one pass over
    /proc, for Process.sample and the orphan reaper."""

    stats: dict[int, ProcStat]
    children_of: dict[int, list[int]]
    read_at: float

    @classmethod
    def read(cls) -> ProcessTable:
        stats: dict[int, ProcStat] = {}
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (stat := read_stat(int(name))) is not None:
                stats[int(name)] = stat
                children.setdefault(stat.ppid, []).append(int(name))
        return cls(stats, children, time.monotonic())

    def zombie_children(self) -> set[int]:
        """The supervisor's own children that have exited and not been waited for."""
        return {pid for pid in self.children_of.get(os.getpid(), ()) if self.stats[pid].zombie}


async def _safe(check: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return bool(await check())
    except Exception:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_tree(pid: int, tree: list[psutil.Process], sig: int) -> None:
    _signal_group(pid, sig)
    for child in tree:
        try:
            child.send_signal(sig)
        except psutil.Error:
            pass
