"""Crash-restart policy, kept pure so it can be tested without processes."""

from __future__ import annotations

from supervisor.config import RestartPolicy


class Backoff:
    """Counts consecutive short-lived runs and says how long to wait before the next.

    With the defaults (0.5 s initial, x2, 30 s cap, 6 retries, stable after 10 s) a
    process that dies at once is retried after 0.5, 1, 2, 4, 8, 16 s and then declared
    FATAL: about 31 s of trying with the CPU idle in between.
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def record_exit(self, ran_for: float) -> float | None:
        """Register an exit after `ran_for` seconds.

        Returns the delay before restarting, or None when the process is FATAL.
        """
        if ran_for >= self.policy.stable_after:
            self.failures = 0
        self.failures += 1
        if self.failures > self.policy.max_retries:
            return None
        return self.delay(self.failures)

    def delay(self, failures: int) -> float:
        return min(self.policy.backoff_initial * 2 ** (failures - 1), self.policy.backoff_max)

    def reset(self) -> None:
        self.failures = 0
