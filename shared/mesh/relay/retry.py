"""When a failed attempt is tried again, and what the client is told when it is not: one
pure decision, asked after a connection failure (nothing was sent, or nothing came back)
and before relaying a 502/503 from an instance.

The rules:
- a request is resent only if everything sent of it is still in hand (its body fitted
  the replay buffer), or nothing was sent yet;
- a connection that failed before anything was sent (refused, connect timeout) is
  retried for any method; one that failed after the request went out, or a 502/503
  answer, only for a request that is safe to send twice (`retry_safe`: an idempotent
  method, or an Idempotency-Key to a service that honours it), since the instance may
  have acted on it;
- at most `Route.retries` more attempts, each on an instance not tried yet;
- a pooled keep-alive connection closed by the instance just as it was reused ("reset")
  is the connection's failure, not the instance's (`stale_connection`): one retry on a
  fresh connection, to any instance including the same one (a single-instance route has
  nowhere else to go), not counted as an attempt;
- a connection this process could not open for want of file descriptors (EMFILE,
  ENFILE) is not retried (another instance needs one too) and is answered 503.
"""

from __future__ import annotations

import errno

from shared.mesh.relay.settings import Route

ANSWER, RETRY, RETRY_FRESH = 0, 1, 2
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE))


def stale_connection(kind: str, fresh_only: bool) -> bool:
    """The failure was a reused connection's, not the instance's (unless it came on a fresh one)."""
    return kind == "reset" and not fresh_only


def next_step(*, stale: bool, any_method: bool, retry_safe: bool, sent_any: bool, replay_kept: bool,
              attempts: int, retries: int, untried: int, local: bool = False) -> int:
    """RETRY_FRESH (a fresh connection), RETRY (another instance) or ANSWER.

    `any_method`: nothing reached the instance; `sent_any`: bytes of the request went out
    on some attempt; `replay_kept`: all of them are still in hand; `attempts`: retries so
    far; `untried`: instances of the route not tried yet; `local`: the failure is this
    process's own (out of file descriptors), which another instance would meet too.
    """
    if local:
        return ANSWER
    if stale and retry_safe and replay_kept:
        return RETRY_FRESH
    if attempts < retries and (replay_kept or not sent_any) and untried > 0 and (any_method or retry_safe):
        return RETRY
    return ANSWER


def failure_answer(kind: str, route: Route) -> tuple[int, str, bool]:
    """(status, message, whether to close even when the request was read whole) when no retry follows."""
    if kind == "connect_timeout":
        return 504, f"{route.name} did not accept a connection in time", False
    if kind == "timeout":
        return 504, f"{route.name} did not answer within {route.request_timeout:g}s", True
    if kind == "descriptors":
        return 503, f"out of file descriptors: cannot reach {route.name} now", False
    return 502, f"{route.name} could not be reached ({kind})", False
