"""Capped exponential backoff, the one every retry loop of the project uses.

Pure (no clock, no sleeping) so that it is tested without processes or sockets:
delays are first, 2*first, 4*first, ... up to cap. Used by the supervisor's crash
restarts (with a retry limit and a "stable run" reset, `CrashBackoff`), by the mesh's
Consul loops (registration, discovery) and by the service kit's database connect loop.
"""

from __future__ import annotations


class Backoff:
    """Counts consecutive failures and says how long to wait before the next try."""

    __slots__ = ("cap", "failures", "first")

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1: `first`)."""
        # The exponent is bounded: past 2**60 the cap has long been reached, and an
        # unbounded int power would overflow the float product.
        return min(self.first * 2 ** min(max(failures - 1, 0), 60), self.cap)

    def next(self) -> float:
        """One more failure: the delay before the next try."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


class CrashBackoff(Backoff):
    """The supervisor's restart policy over a Backoff: a run shorter than `stable_after`
    counts as a failure, a longer one starts the count afresh, and more than
    `max_retries` consecutive failures mean FATAL.

    With the defaults (0.5 s initial, x2, 30 s cap, 6 retries, stable after 10 s) a
    process that dies at once is retried after 0.5, 1, 2, 4, 8, 16 s and then declared
    FATAL: about 31 s of trying with the CPU idle in between.
    """

    __slots__ = ("max_retries", "stable_after")

    def __init__(self, first: float, cap: float, max_retries: int, stable_after: float) -> None:
        super().__init__(first, cap)
        self.max_retries = max_retries
        self.stable_after = stable_after

    def record_exit(self, ran_for: float) -> float | None:
        """Register an exit after `ran_for` seconds: the delay before restarting, or None
        when the process is FATAL."""
        if ran_for >= self.stable_after:
            self.failures = 0
        delay = self.next()
        return None if self.failures > self.max_retries else delay
