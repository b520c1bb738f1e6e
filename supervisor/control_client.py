"""The control API's client (the server and the routes: supervisor/control.py).

Built on the standard library, not aiohttp: every `supervisor status` and the other
verbs of the CLI import it, and aiohttp's client alone took longer to import than the
supervisor takes to answer. So nothing here imports aiohttp or asyncio.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

import msgspec


class NotRunning(Exception):
    """No supervisor answers at the socket: it is missing or refuses connections."""


class ControlError(Exception):
    """The supervisor answered with an error; str() is what to show the operator."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 to the control socket: http.client with the socket opened at a path."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("supervisor", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Calls of the control API, one connection each; a call returns with the answer
    (the verbs answer once done).

    `timeout` bounds the connection and each wait for the answer (it comes in one piece
    once the verb is done); running out raises TimeoutError.
    """

    def __init__(self, path: Path, timeout: float = 600) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, method: str, route: str, body=None) -> dict:
        """The answer's JSON; a 409 (the verb's problems) is an answer too, other errors
        raise ControlError, and no supervisor at the socket NotRunning."""
        if not self.path.exists():
            raise NotRunning()
        conn = _UnixConnection(self.path, self.timeout)
        try:
            try:
                conn.connect()
            except TimeoutError:  # there, but too busy to accept: running, not answering
                raise
            except OSError:  # gone, refused, or not ours to reach: nobody answers there
                raise NotRunning() from None
            data = msgspec.json.encode(body) if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, route, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            payload = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ControlError(f"HTTP {resp.status} from the supervisor") from None
        if resp.status >= 400 and resp.status != 409:
            raise ControlError("; ".join(payload.get("problems", [])) or f"HTTP {resp.status}")
        return payload
