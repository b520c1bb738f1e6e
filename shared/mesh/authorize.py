"""Who may call this service: Connect intentions, asked of the local agent per client identity.

A sidecar's listener accepts only mTLS connections whose client certificate chains to the
Connect CA (shared.mesh.identity); which services may then send requests is the
intentions' business:

- the first connection from a client identity (its SPIFFE URI) asks the agent
  (`POST /v1/agent/connect/authorize`, answered from the agent's cached intentions, so it
  works while the servers are down) and the answer is kept as a `Decision` shared by
  every connection of that identity;
- intentions are followed with a blocking query (`/v1/connect/intentions`, readable with a
  service identity's token); when they change, every kept decision is asked again and
  updated in place, so a connection opened before a change to deny is refused on its next
  request (Consul itself never closes open connections, consul #5277), within the time it
  takes the watch to answer and the agent to re-authorize: well under 2 s;
- the agent does not check the certificate's serial or trust domain; the TLS layer did
  (chain to our roots) and `Identity.peer_service` did (our trust domain);
- when the agent cannot be asked, a kept decision stands and an unknown identity is
  refused (fail closed), with `problem` saying why.
"""

from __future__ import annotations

import asyncio
from typing import Any

import consul.aio

from shared.mesh.consul import Log, LogTarget, call, describe
from shared.mesh.watch import BlockingWatch

LOGGER = "meshvisor.authorize"
ASK_TIMEOUT = 2.0
# Seconds between the asks after a change of the intentions (see Authorizer._ask_again).
RECHECK_AFTER = (0.0, 0.5, 1.0)


class Decision:
    """Whether one client identity may call the target; updated in place on changes."""

    __slots__ = ("allowed", "reason", "uri")

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.allowed = False
        self.reason = "not asked yet"

    @property
    def caller(self) -> str:
        """The calling service's name, for messages (the last segment of its SPIFFE URI)."""
        return self.uri.rsplit("/svc/", 1)[-1] if "/svc/" in self.uri else "this caller"

    def __repr__(self) -> str:
        return f"Decision({self.uri} allowed={self.allowed} {self.reason!r})"


class IntentionsWatch(BlockingWatch[tuple]):
    """The intentions' (ID, ModifyIndex) pairs: enough to know that something changed."""

    def __init__(self, client: consul.aio.Consul, *, on_change, log: LogTarget = None) -> None:
        super().__init__(client, wait=300.0, on_change=on_change, log=log, what="intentions")
        self.version: tuple | None = None

    def _path(self) -> str:
        return "/v1/connect/intentions"

    def _apply(self, data: Any, keep_missing: bool) -> tuple | None:
        version = tuple(sorted((i["ID"], i.get("ModifyIndex", 0)) for i in data or ()))
        if version == self.version:
            return None
        first = self.version is None
        self.version = version
        return None if first else version

    def _describe_kept(self) -> str:
        return "keeping the decisions made so far"


class Authorizer:
    def __init__(self, client: consul.aio.Consul, target: str, *, log: LogTarget = None) -> None:
        self._client = client
        self.target = target
        self._log = Log(log, LOGGER)
        self.decisions: dict[str, Decision] = {}
        self._pending: dict[str, asyncio.Future[Decision]] = {}
        self.problem = ""
        self.rechecks = 0
        self._watch = IntentionsWatch(client, on_change=self._intentions_changed, log=log)
        self._recheck: asyncio.Task | None = None

    async def start(self) -> None:
        await self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()
        if self._recheck is not None:
            self._recheck.cancel()

    def known(self, uri: str) -> Decision | None:
        """The kept decision for `uri`, without asking (the per-connection fast path)."""
        return self.decisions.get(uri)

    async def decide(self, uri: str, serial: str) -> Decision:
        """The decision for `uri`, asking the agent the first time (one question per
        identity however many connections arrive at once)."""
        decision = self.decisions.get(uri)
        if decision is not None:
            return decision
        pending = self._pending.get(uri)
        if pending is None:
            pending = self._pending[uri] = asyncio.get_running_loop().create_future()
            decision = Decision(uri)
            try:
                await self._ask(decision, serial)
            except BaseException:
                pending.cancel()  # cancelled: the connections waiting on it are not left waiting
                raise
            finally:
                del self._pending[uri]
            if self.problem == "":  # an answer from the agent: keep it
                self.decisions[uri] = decision
            pending.set_result(decision)
            return decision
        return await asyncio.shield(pending)

    async def _ask(self, decision: Decision, serial: str) -> None:
        try:
            reply = await call(self._client, "POST", "/v1/agent/connect/authorize",
                               payload={"Target": self.target, "ClientCertURI": decision.uri,
                                        "ClientCertSerial": serial}, timeout=ASK_TIMEOUT)
            answer = reply.raise_for_status().json()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the agent is unreachable or refuses us: fail closed
            if not self.problem:
                self._log.warning(f"cannot authorize callers of {self.target}: {describe(exc)}")
            self.problem = f"authorize: {describe(exc)}"
            decision.reason = "the local Consul agent could not be asked"
            return
        if self.problem:
            self._log.info(f"authorizing callers of {self.target} again")
        self.problem = ""
        allowed = bool(answer.get("Authorized"))
        if allowed != decision.allowed or decision.reason == "not asked yet":
            self._log.info(f"{decision.uri} -> {self.target}: {'allowed' if allowed else 'denied'} "
                           f"({answer.get('Reason', '')})")
        decision.allowed = allowed
        decision.reason = str(answer.get("Reason", ""))

    def _intentions_changed(self, _version: tuple) -> None:
        if self._recheck is not None:
            self._recheck.cancel()  # a newer change: start the sequence again
        self._recheck = asyncio.get_running_loop().create_task(self._ask_again())

    async def _ask_again(self) -> None:
        """Every kept decision, asked again (in place: connections see the new answer).

        The agent answers authorize from its own cache of the intentions, which follows
        the servers with a blocking query of its own and may lag the answer our watch got:
        so ask at once and again a little later (RECHECK_AFTER)."""
        self.rechecks += 1
        for delay in RECHECK_AFTER:
            await asyncio.sleep(delay)
            await asyncio.gather(*(self._ask(d, "") for d in list(self.decisions.values())))
