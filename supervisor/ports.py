"""Hands out instance ports from the configured range.

A cursor walks the range so that a port just given back is not reused at once (a
gateway may still hold the old address for a moment), and every candidate is test-bound
so a port some other program listens on is skipped.
"""

from __future__ import annotations

import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class PortsExhausted(Exception):
    pass


class PortAllocator:
    def __init__(self, host: str, low: int, high: int, also: tuple[str, ...] = ()) -> None:
        self.hosts = (host, *also)
        self.low, self.high = low, high
        self._taken: set[int] = set()
        self._cursor = low

    def take(self) -> int:
        size = self.high - self.low + 1
        for _ in range(size):
            port = self._cursor
            self._cursor = self.low if port >= self.high else port + 1
            if port not in self._taken and all(is_free(host, port) for host in self.hosts):
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


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel picks as source ports of outgoing connections."""
    try:
        low, high = (int(n) for n in EPHEMERAL_RANGE_FILE.read_text().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def ephemeral_overlap(low: int, high: int) -> tuple[int, int] | None:
    """The part of [low, high] the kernel may hand to outgoing connections, if any: such a
    port can be taken by some connection while its instance restarts, which then cannot
    bind it again."""
    e_low, e_high = ephemeral_range()
    start, end = max(low, e_low), min(high, e_high)
    return (start, end) if start <= end else None
