"""The state directory: one-supervisor lock, record of live pids, remembered scale and stops.

Layout under <state_dir>:
  run/supervisor.lock   flock held by the live supervisor (released by the kernel on death)
  run/control.sock      control API (owner only)
  run/pids.json         every process the supervisor started, to clean up after a SIGKILL
  scale.json            instance counts set with `supervisor scale`
  stopped.json          services stopped with `supervisor stop NAME`
  logs/                 one file per process, rotated by size
  consul/, postgres/    embedded infrastructure data
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

# psutil is imported inside the two functions of the running supervisor that use it: the
# CLI imports this module for holder_pid and prepare, and importing psutil cost it ~20 ms.


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(pid)
        self.pid = pid


def prepare(state_dir: Path) -> None:
    for sub in ("", "run", "logs"):
        path = state_dir / sub
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir / "run", 0o700)


class Lock:
    """Exclusive flock on run/supervisor.lock; the file also holds the holder's pid."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "run" / "supervisor.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(holder_pid(self.path.parent.parent)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder_pid(state_dir: Path) -> int | None:
    """Pid of the live supervisor of this state directory, or None."""
    path = state_dir / "run" / "supervisor.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode() or "0"
            return int(text) if text.strip().isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class PidRecord:
    """run/pids.json: {pid: {name, create_time}} of every live child, rewritten on change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "run" / "pids.json"
        self._pids: dict[int, dict] = {}

    def add(self, pid: int, name: str) -> None:
        import psutil

        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._pids[pid] = {"name": name, "create_time": created}
        self._flush()

    def remove(self, pid: int) -> None:
        if self._pids.pop(pid, None) is not None:
            self._flush()

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in self._pids.items()}))
        os.replace(tmp, self.path)


def clean_leftovers(state_dir: Path, say, grace: float = 5.0) -> int:
    """Stop what a supervisor that died without cleaning up left running. Returns the count.

    Every recorded process led its own process group; the group outlives its leader as
    long as something it forked runs, so members are found by group id, not by parent.
    """
    import psutil

    path = state_dir / "run" / "pids.json"
    try:
        recorded = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0
    groups: dict[int, float] = {}
    for pid_text, info in recorded.items():
        try:
            groups[int(pid_text)] = float(info["create_time"])
        except (KeyError, ValueError, TypeError):
            continue
    leftovers: list[psutil.Process] = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            pgid = os.getpgid(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
        # Same group id and started no earlier than its leader: ours, not a pid reuse.
        since = groups.get(pgid)
        if since is not None and proc.info["create_time"] >= since - 0.01 and proc.pid != os.getpid():
            leftovers.append(proc)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in leftovers:
        say(f"stopping leftover {proc.pid} of a previous supervisor")
    _, alive = psutil.wait_procs(leftovers, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
    path.unlink(missing_ok=True)
    return len(leftovers)


class ScaleMemory:
    """Counts set with `supervisor scale`, remembered across restarts.

    Each entry also records the count the config file had at the time: once somebody
    edits the file, the file wins again.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "scale.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def count(self, service: str, configured: int) -> int:
        entry = self._read().get(service)
        if entry and entry.get("configured") == configured:
            return int(entry["count"])
        return configured

    def remember(self, service: str, count: int, configured: int) -> None:
        data = self._read()
        data[service] = {"count": count, "configured": configured, "at": time.time()}
        _write_json(self.path, data)

    def forget(self, service: str) -> None:
        """The file's count wins again (a reload that changed it, or removed the service)."""
        data = self._read()
        if data.pop(service, None) is not None:
            _write_json(self.path, data)


class StoppedServices:
    """Services stopped with `supervisor stop NAME`, remembered across restarts.

    A marked service is left stopped by `supervisor start` (of the stack) and by a reload,
    until `supervisor start NAME` clears its mark; a reload that removes the service from
    the files forgets it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "stopped.json"

    def names(self) -> set[str]:
        try:
            return set(json.loads(self.path.read_text()).get("stopped", []))
        except (FileNotFoundError, ValueError, AttributeError):
            return set()

    def __contains__(self, service: str) -> bool:
        return service in self.names()

    def mark(self, service: str) -> None:
        self._save(self.names() | {service})

    def clear(self, service: str) -> None:
        names = self.names()
        if service in names:
            self._save(names - {service})

    def _save(self, names: set[str]) -> None:
        _write_json(self.path, {"stopped": sorted(names), "at": time.time()})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
