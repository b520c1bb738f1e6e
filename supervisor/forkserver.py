"""Starting sidecars by fork from one process that imported the sidecar once (sidecar/forkserver.py).

The supervisor runs the fork server like any infrastructure process and, for a sidecar,
asks it for a fork instead of exec'ing `python -m sidecar`: the same environment, working
directory, own session and parent-death signal, its output through a pipe to the
supervisor, but the interpreter and the imports shared with every other sidecar of the
host. The forked sidecar is the supervisor's own child (the supervisor is a child
subreaper: the fork server forks twice and the middle child exits), so it is waited for,
signalled and restarted exactly like an exec'd one; ForkedChild gives Process the same
four things asyncio's subprocess does (pid, stdout, wait(), returncode).

When the fork server is not running (starting, restarting, or refused), a sidecar is
exec'd as before: forking saves memory and start-up time, it is never what a start waits for.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import socket
import sys

from shared.procctl import become_child_subreaper, peer_credentials
from supervisor.process import Process, ProcessSpec, State

FORK_SERVER_RESTART_TIMEOUT = 15.0


def socket_name() -> str:
    # Abstract: no file, no length limit of a path under a deep state folder; who may use
    # it is checked on both ends by peer credentials (see sidecar/forkserver.py).
    return f"meshvisor/forkserver/{os.getpid()}/{secrets.token_hex(8)}"


class ForkedChild:
    """An asyncio.subprocess.Process look-alike for a child we did not spawn ourselves."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        # A pidfd is readable once the process has exited; until we reap it, the pid
        # cannot be reused, so opening it by number is safe for our own child.
        self._pidfd = os.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            pid, status = self.pid, -1
        if pid == 0:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status) if status != -1 else 255
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class ForkServer:
    """The supervisor's end: the fork server's process, and a fork per sidecar asked of it."""

    def __init__(self) -> None:
        self.name = socket_name()
        self.process: Process | None = None  # set by attach()
        self._imported = ""  # code_fingerprint() when the running fork server started
        self._refresh = asyncio.Lock()

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "sidecar.forkserver", self.name]

    def attach(self, process: Process) -> None:
        """`process` runs argv(); it imports the code as it is when it is spawned."""
        self.process = process
        process.spawn_listeners.append(lambda _: setattr(self, "_imported", code_fingerprint()))

    async def ready(self) -> bool:
        """Answers the ping from its socket."""
        if self.process is None or self.process.pid is None:
            return False
        return await asyncio.to_thread(self.ping, self.process.pid)

    def ping(self, server_pid: int) -> bool:
        """An empty request: the fork server answers {"ok": true} once it serves."""
        return self.ask(b"", None, server_pid).get("ok") is True

    async def fork(self, spec: ProcessSpec) -> ForkedChild | None:
        """ProcessSpec.fork for a sidecar: None while the fork server is not running."""
        if self.process is None or not spec_is_forkable(spec):
            return None
        await self._restart_if_code_changed()
        process = self.process
        if process.state != State.RUNNING or process.pid is None:
            return None
        return await self._spawn(spec, process.pid)

    async def _restart_if_code_changed(self) -> None:
        """A sidecar restarted after a deploy must run the new code, as an exec'd one would:
        when the sidecar's or the shared library's sources, or the installed packages, changed
        since the fork server imported them, it is restarted first (one restart, however many
        sidecars are waiting)."""
        async with self._refresh:
            process = self.process
            if process is None or process.state != State.RUNNING or code_fingerprint() == self._imported:
                return
            process.log.write(b"[meshvisor] the sidecar's code changed since the fork server imported it: restarting it")
            await process.stop()
            process.start()
            await process.wait_settled(FORK_SERVER_RESTART_TIMEOUT)

    async def _spawn(self, spec: ProcessSpec, server_pid: int) -> ForkedChild:
        """Fork a sidecar with the spec's environment and working directory; OSError if
        the fork server cannot (the caller then exec's it)."""
        read_end, write_end = os.pipe()
        try:
            request = fork_request(spec.env, spec.cwd, spec.parent_death_signal)
            reply = await asyncio.to_thread(self.ask, request, write_end, server_pid)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        if "pid" not in reply:
            os.close(read_end)
            raise OSError(f"the sidecar fork server refused: {reply.get('error', 'no reason')}")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                     os.fdopen(read_end, "rb", 0))
        return ForkedChild(int(reply["pid"]), reader)

    def ask(self, request: bytes, output: int | None, server_pid: int) -> dict:
        """One request (fork_request, with `output` as the sidecar's stdout; or the ping)
        to the fork server whose pid is `server_pid`, and its JSON reply; blocking."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect("\0" + self.name)
            pid, _uid, _gid = peer_credentials(conn)
            if pid != server_pid:  # someone else holds the name: it gets no environment of ours
                raise OSError(f"the fork server's socket is held by pid {pid}, not {server_pid}")
            if output is not None:
                sent = socket.send_fds(conn, [request], [output])
                conn.sendall(request[sent:])
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        try:
            return json.loads(data)
        except ValueError:
            raise OSError("the fork server closed the connection without an answer") from None


def fork_request(env: dict[str, str], cwd: str, death_signal: int) -> bytes:
    """What the fork server needs for a sidecar (sidecar/forkserver.py): this process is the
    one it is handed to, and whose death it follows."""
    return json.dumps({"env": env, "cwd": cwd, "supervisor": os.getpid(), "death_signal": int(death_signal)}).encode()


class OrphanReaper:
    """Reaps what comes to us as a child subreaper and nobody waits for.

    Besides the forked sidecars, any orphaned descendant of a supervised process (say a
    worker whose app was SIGKILLed) now becomes the supervisor's child instead of init's;
    left alone it would stay a zombie. A zombie child that is not a supervised process
    and was already one at the previous look (so a sidecar whose fork is being announced
    is not taken) is reaped here."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def reap(self, zombies: set[int], supervised: set[int]) -> int:
        suspects = zombies - supervised
        reaped = 0
        for pid in suspects & self._seen:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
            except ChildProcessError:
                pass
        self._seen = suspects
        return reaped


def code_fingerprint() -> str:
    """When what a fork server imports last changed: the newest modification time among the
    sources of the sidecar and shared packages, and of the directory the dependencies are
    installed in (pip adds and removes a folder there per package it installs)."""
    newest = 0.0
    for package in ("sidecar", "shared"):
        found = importlib.util.find_spec(package)
        for folder in (found.submodule_search_locations or []) if found else []:
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    if name.endswith(".py"):
                        try:
                            newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
                        except OSError:
                            pass
    dependency = importlib.util.find_spec("aiohttp")  # any installed package: its parent is site-packages
    if dependency is not None and dependency.origin:
        try:
            newest = max(newest, os.stat(os.path.dirname(os.path.dirname(dependency.origin))).st_mtime)
        except OSError:
            pass
    return repr(newest)


def spec_is_forkable(spec: ProcessSpec) -> bool:
    """A sidecar that runs as the supervisor's user, as `python -m sidecar`."""
    return spec.argv == [sys.executable, "-m", "sidecar"] and spec.user is None and spec.group is None

