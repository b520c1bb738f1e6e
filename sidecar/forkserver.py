"""The sidecars' fork server: imports the sidecar once, then forks a sidecar per request.

A sidecar started with `python -m sidecar` spends ~34 MB of its own on the interpreter and
its imports (aiohttp, asyncio, ssl, py-consul, ...), as much as the app it fronts. Forked
from one process that has imported all of it and frozen it for the garbage collector
(gc.freeze: a collection never writes to those objects, so their pages stay shared), each
sidecar keeps only what it writes after the fork (bench/README.md has the figures).

    python -m sidecar.forkserver NAME

listens on the abstract Unix socket NAME and answers the supervisor (supervisor/forkserver.py),
one request at a time:

    request: JSON {"env", "cwd", "supervisor", "death_signal"} + one descriptor (the write
             end of the pipe that becomes the sidecar's stdout and stderr)
    reply:   JSON {"pid"} or {"error"}

The sidecar is forked twice, so that it ends up the supervisor's child (the supervisor
is a child subreaper) and not this server's: the supervisor waits for it, signals it and
restarts it like any process it started, and a sidecar does not die with this server.

Who may connect: an abstract socket has no file permissions, so every connection's peer
credentials are checked: only this server's own user (the supervisor's) is answered; the
supervisor checks in turn that the socket it reached is held by the process it started.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import time

# Everything a running sidecar imports, imported once here and shared by every fork.
import sidecar.main  # noqa: F401  (sidecar, relay, mTLS, discovery, telemetry, ...)
from shared.mesh.endpoint import run_process
from shared.procctl import die_with_parent, peer_credentials
from sidecar.settings import SidecarSettings

MAX_REQUEST = 1 << 20  # a sidecar's whole environment fits many times over


def serve(name: str) -> None:
    # The process title library finds the command line's memory from the environment as
    # it was at start; a sidecar replaces the environment, so it is set up here, once.
    os.environ["SPT_NOENV"] = "1"
    import setproctitle

    setproctitle.setproctitle("sidecar fork server")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(64)
    # From here on nothing new is allocated per request that a fork would care about:
    # freeze what the imports made, so the children's collections leave those pages alone.
    gc.collect()
    gc.freeze()
    print(json.dumps({"ts": round(time.time(), 3), "level": "info", "logger": "meshvisor.forkserver",
                      "msg": "serving", "modules": len(sys.modules)}), flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            if peer_credentials(conn)[1] != os.getuid():
                continue  # not our user: no answer at all
            try:
                reply = handle(conn, listener)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                conn.sendall(json.dumps(reply).encode())
            except OSError:
                pass


def handle(conn: socket.socket, listener: socket.socket) -> dict:
    conn.settimeout(5)
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 1)
    if not data and not fds:
        return {"ok": True}  # the supervisor's readiness ping
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected one descriptor (the output pipe)")
    output = fds[0]
    try:
        while len(data) < MAX_REQUEST and (more := conn.recv(65536)):  # up to the supervisor's shutdown
            data += more
        request = json.loads(data)
        env, cwd = dict(request["env"]), str(request["cwd"])
        supervisor, death_signal = int(request["supervisor"]), int(request["death_signal"])
        report_r, report_w = os.pipe()
        middle = os.fork()
        if middle == 0:  # the middle child: fork the sidecar, tell its pid, exit
            try:
                os.close(report_r)
                pid = os.fork()
                if pid == 0:
                    os.close(report_w)
                    become_sidecar(env, cwd, output, supervisor, death_signal, conn, listener)
                os.write(report_w, str(pid).encode())
            finally:
                os._exit(0)
        os.close(report_w)
        os.waitpid(middle, 0)
        with os.fdopen(report_r, "rb") as report:
            pid_text = report.read()
        if not pid_text:
            raise OSError("the sidecar could not be forked")
        return {"pid": int(pid_text)}
    finally:
        os.close(output)


def become_sidecar(env: dict[str, str], cwd: str, output: int, supervisor: int, death_signal: int,
                   conn: socket.socket, listener: socket.socket) -> None:
    """In the sidecar: what exec and the supervisor's spawn would have done, then run it."""
    try:
        conn.close()
        listener.close()
        os.setsid()  # its own session and process group, as for every supervised process
        # The middle child exits at once and this process is handed to the nearest child
        # subreaper, the supervisor; only then does a parent-death signal mean "the supervisor".
        deadline = time.monotonic() + 5
        while os.getppid() != supervisor:
            if time.monotonic() > deadline:
                os._exit(1)
            time.sleep(0.0005)
        if not die_with_parent(death_signal, supervisor):  # the supervisor died before it took effect
            os._exit(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.closerange(3, 1 << 16)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = [sys.argv[0]]
    except BaseException:
        os._exit(1)
    code = 0
    try:
        run_process(SidecarSettings, lambda settings: sidecar.main.Sidecar(settings).run())
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # never back into this server's loop


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m sidecar.forkserver SOCKET_NAME", file=sys.stderr)
        sys.exit(2)
    serve(sys.argv[1])


if __name__ == "__main__":
    main()
