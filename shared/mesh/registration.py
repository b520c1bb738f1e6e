"""The registration of one instance in the local Consul agent, kept true by anti-entropy.

Like Consul's own agent, which keeps the catalog in line with its local state, the sidecar
keeps the agent in line with what it wants: registered (with one HTTP check through the
sidecar to the app) or not. If the agent forgets us (a dev-mode or wiped agent that
restarted, an operator's deregister), `run_anti_entropy` registers us again within a
second of the agent answering.

Why each registration carries a new CheckID: on re-registration Consul keeps the status
of a check it already has under the same ID (it restores its own snapshot; checked on
1.8.7), so "register again with Status critical" would leave a passing check passing. A
new CheckID (with replace-existing-checks, which drops the old one) makes the agent take
the Status we send, at once, and the HTTP check keeps running from there.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import consul.aio

from shared.backoff import Backoff
from shared.mesh.consul import (
    CHECK_FIELDS_SINCE,
    REQUEST_TIMEOUT,
    ConsulError,
    Log,
    LogTarget,
    OutageReporter,
    Reply,
    agent_version,
    call,
    describe,
    duration,
    http_check,
    registration_payload,
)

STATUSES = ("passing", "warning", "critical")

# Blocking wait on our own service definition: a change (or an agent restart, which drops
# the connection) ends it early, so this only bounds how long one request lives.
ANTI_ENTROPY_WAIT = 30.0
# Retries while the agent is away: capped at 1 s, so a restarted agent is seen within 1 s.
RETRY_FIRST = 0.1
RETRY_MAX = 1.0
# At most one round of the loop per this many seconds, whatever the agent answers.
MIN_ROUND_INTERVAL = 0.1
# How often wait_passing asks the agent.
HEALTH_POLL_INTERVAL = 0.1

LOGGER = "meshvisor.shared.mesh.registration"


class Registration:
    """One instance (`service_id`) of service `name` at `address:port`, in the local agent.

    `registered`: the agent last confirmed it holds this instance. `wanted`: register()
    was called and deregister() was not since; what the anti-entropy loop converges to.
    `check_id`: the ID of the current HTTP check (new on every registration sent).
    """

    def __init__(
        self,
        client: consul.aio.Consul,
        *,
        service_id: str,
        name: str,
        address: str,
        port: int,
        meta: Mapping[str, str],
        check_url: str,
        check_interval: str = "2s",
        check_timeout: str = "1s",
        deregister_after: str = "1m",
        tags: Iterable[str] = (),
        check_options: Mapping[str, Any] | None = None,
        connect_native: bool = False,
        log: LogTarget = None,
    ) -> None:
        self._client = client
        self.connect_native = connect_native
        self.service_id = service_id
        self.name = name
        self.address = address
        self.port = port
        self.meta = dict(meta)
        self.tags = list(tags)
        self.check_url = check_url
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        # Consul's minimum is 1 minute (its reaper runs every 30 s): the safety net for a
        # sidecar that died without deregistering, not the way instances normally leave.
        self.deregister_after = deregister_after
        self.check_options = dict(check_options or {})
        self._log = Log(log, LOGGER)
        self.check_id = ""
        # `registered`: the agent last confirmed it holds us. `_wanted`: we want it to.
        self.registered = False
        self._wanted = asyncio.Event()
        # Bumped by every change we make in the agent, so that the anti-entropy loop does
        # not act on an answer that a newer registration or deregistration made stale.
        self._generation = 0
        self._lock = asyncio.Lock()
        self._warned_dropped = False

    @property
    def wanted(self) -> bool:
        return self._wanted.is_set()

    async def register(self, initial_status: str = "passing") -> None:
        """Register (or re-register) with the check starting at `initial_status`.

        "passing" when the sidecar has just seen the app healthy, so traffic comes at
        once; "critical" to take the instance out of rotation until the check passes.
        Raises if the agent cannot be reached or refuses; a running anti-entropy task
        keeps trying in that case.
        """
        if initial_status not in STATUSES:
            raise ValueError(f"initial_status must be one of {STATUSES}, not {initial_status!r}")
        self._wanted.set()
        async with self._lock:
            await self._send(initial_status)

    async def mark_critical(self) -> None:
        """Take the instance out of rotation now (the app died); its check may bring it back.

        Does nothing when not registered; if the agent is down, logs and returns (once
        back, the agent's own check finds the app dead, and an agent that lost us gets
        us back critical from the anti-entropy loop).
        """
        if not self.wanted:
            return
        async with self._lock:
            if not self.wanted:
                return
            try:
                await self._send("critical")
            except Exception as exc:
                self._log.warning(f"could not mark {self.service_id} critical: {describe(exc)}")

    async def deregister(self) -> None:
        """Leave the agent. If the agent is down, logs and returns."""
        self._wanted.clear()
        path = f"/v1/agent/service/deregister/{self.service_id}"
        async with self._lock:
            self.registered = False
            self._generation += 1
            try:
                reply = await call(self._client, "PUT", path)
            except Exception as exc:
                self._log.warning(f"could not deregister {self.service_id}: {describe(exc)}")
                return
            if reply.ok or reply.status == 404:
                self._log.info(f"deregistered {self.service_id}")
            else:
                self._log.warning(f"could not deregister {self.service_id}: {reply.status} {reply.body.strip()}")

    async def run_anti_entropy(self) -> None:
        """Until cancelled: whenever the agent does not hold us while we want it to, register.

        Blocks on /v1/agent/service/<id> with the ContentHash (Consul >= 1.3): a
        deregistration ends the wait at once with 404, and a restarting agent drops the
        connection, after which we retry at least once a second.
        """
        loop = asyncio.get_running_loop()
        outage = OutageReporter(self._log, f"registration of {self.service_id}")
        retry = Backoff(RETRY_FIRST, RETRY_MAX)
        content_hash = ""
        last_round = -1e9
        while True:
            await self._wanted.wait()
            pause = last_round + MIN_ROUND_INTERVAL - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            last_round = loop.time()
            generation = self._generation
            try:
                reply = await self._fetch_definition(content_hash)
                if reply.status == 404:
                    content_hash = ""
                    await self._restore(generation)
                else:
                    reply.raise_for_status()
                    content_hash = reply.content_hash
                    if generation == self._generation:
                        self.registered = self.wanted
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outage.failed(exc)
                # A restarted agent has a new hash; blocking on the old one could hang.
                content_hash = ""
                await asyncio.sleep(retry.next())
                continue
            outage.recovered()
            retry.reset()

    async def health(self, timeout: float = REQUEST_TIMEOUT) -> str | None:
        """The agent's aggregated status of this instance ("passing", "warning",
        "critical"), or None when the agent does not know it or cannot be reached."""
        try:
            reply = await call(
                self._client,
                "GET",
                f"/v1/agent/health/service/id/{self.service_id}",
                params=[("format", "text")],
                timeout=timeout,
            )
        except Exception:
            return None
        # 200 passing, 429 warning, 503 critical, 404 unknown (Consul >= 1.2.3).
        status = reply.body.strip()
        return status if reply.status in (200, 429, 503) and status in STATUSES else None

    async def wait_passing(self, timeout: float) -> bool:
        """True as soon as the agent reports this instance passing; False after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await self.health(timeout=max(deadline - loop.time(), HEALTH_POLL_INTERVAL)) == "passing":
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(HEALTH_POLL_INTERVAL, remaining))

    # -- internals

    async def _restore(self, generation: int) -> None:
        """The agent answered 404 for us: register again, unless that is stale news."""
        async with self._lock:
            self.registered = False
            if not self.wanted or generation != self._generation:
                return
            self._log.warning(f"Consul agent does not know {self.service_id} (restarted?): registering it again")
            # Critical until the check passes, as Consul itself restores its services: the
            # app may have died while the agent was away.
            await self._send("critical")

    async def _fetch_definition(self, content_hash: str) -> Reply:
        path = f"/v1/agent/service/{self.service_id}"
        if not content_hash:
            return await call(self._client, "GET", path)
        params = [("hash", content_hash), ("wait", duration(ANTI_ENTROPY_WAIT))]
        timeout = ANTI_ENTROPY_WAIT + ANTI_ENTROPY_WAIT / 16 + REQUEST_TIMEOUT
        return await call(self._client, "GET", path, params=params, timeout=timeout)

    async def _send(self, status: str) -> None:
        """PUT the registration with a fresh check at `status`. Caller holds the lock."""
        version = await agent_version(self._client)
        check_id = f"{self.service_id}:http:{secrets.token_hex(4)}"
        check = http_check(
            self.check_url,
            check_id=check_id,
            name=f"{self.name} health",
            interval=self.check_interval,
            timeout=self.check_timeout,
            deregister_after=self.deregister_after,
            status=status,
            options=self.check_options,
        )
        payload = registration_payload(
            service_id=self.service_id,
            name=self.name,
            address=self.address,
            port=self.port,
            meta=self.meta,
            tags=self.tags,
            check=check,
            connect_native=self.connect_native,
            version=version,
        )
        self._warn_dropped(check, payload["Check"], version)
        reply = await call(
            self._client,
            "PUT",
            "/v1/agent/service/register",
            params=[("replace-existing-checks", "true")],  # drops the previous CheckID
            payload=payload,
        )
        if not reply.ok:
            raise ConsulError("PUT", "/v1/agent/service/register", reply.status, reply.body)
        self._generation += 1
        self.check_id = check_id
        self.registered = True
        self._log.info(f"registered {self.service_id} ({self.name} at {self.address}:{self.port}, check {status})")

    def _warn_dropped(self, wanted: Mapping[str, Any], sent: Mapping[str, Any], version: tuple[int, int, int]) -> None:
        dropped = sorted(set(wanted) - set(sent))
        if dropped and not self._warned_dropped:
            self._warned_dropped = True
            needs = ", ".join(f"{key} (Consul {'.'.join(map(str, CHECK_FIELDS_SINCE[key]))})" for key in dropped)
            self._log.warning(f"Consul agent {'.'.join(map(str, version))} is too old for check field(s) {needs}: not sent")
