"""Infrastructure the supervisor can run itself: a Consul agent and a PostgreSQL server.

Both are servers run the same way (`server_spec`): restarted patiently, and stopped with
their own clean-shutdown signal, also when the supervisor dies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from supervisor.config import RestartPolicy
from supervisor.process import ProcessSpec

# Restarts of a server: quick first, then patient; a broken server ends FATAL.
RESTART_POLICY = RestartPolicy(backoff_initial=1.0, backoff_max=30.0, max_retries=8, stable_after=30.0)


# The checkout this code runs from: `make setup` fetches Consul and Prometheus into its .tools/.
_CHECKOUT = Path(__file__).resolve().parents[2]


def fetched_binary(root: Path, tool: str) -> str | None:
    """The `tool` binary `make setup` unpacked into .tools/<tool>/ of the project or of this
    checkout, or None."""
    for base in (root, _CHECKOUT):
        local = base / ".tools" / tool / "usr" / "bin" / tool
        if local.exists():
            return str(local)
    return None


class InfraError(Exception):
    """Infrastructure could not be brought up; the message says why."""


def server_spec(name: str, argv: list[str], env: dict[str, str], cwd: str, *, stop_timeout: float,
                stop_signal: int, port: int, ready_check: Callable[[], Awaitable[bool]],
                user: int | None = None, group: int | None = None) -> ProcessSpec:
    """A server's process: restarted by RESTART_POLICY, and sent its clean-shutdown signal
    both when it is stopped and when the supervisor dies (whatever the way)."""
    return ProcessSpec(
        name=name, argv=argv, env=env, cwd=cwd, restart=RESTART_POLICY,
        stop_timeout=stop_timeout, stop_signal=stop_signal, parent_death_signal=stop_signal,
        user=user, group=group, port=port, ready_check=ready_check,
    )
