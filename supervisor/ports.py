"""Hands out instance ports from the configured range.

A cursor walks the range so that a port just given back is not reused at once (a
gateway may still hold the old address for a moment), and every candidate is test-bound
so a port some other program listens on is skipped.
"""

from __future__ import annotations

import socket


class PortsExhausted(Exception):
    pass


class PortAllocator:
    def __init__(self, host: str, low: int, high: int) -> None:
        self.host = host
        self.low, self.high = low, high
        self._taken: set[int] = set()
        self._cursor = low

    def take(self) -> int:
        size = self.high - self.low + 1
        for _ in range(size):
            port = self._cursor
            self._cursor = self.low if port >= self.high else port + 1
            if port not in self._taken and is_free(self.host, port):
                self._taken.add(port)
                return port
        raise PortsExhausted(f"no free port left in [{self.low}, {self.high}]")

    def release(self, port: int) -> None:
        self._taken.discard(port)


def is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
