from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.helpers import ConsulDevAgent


@pytest.fixture(scope="session")
def consul_agent():
    """A real Consul agent (dev mode: in memory, leader at once) shared by the session.

    Yields its HTTP address.
    """
    agent = ConsulDevAgent()
    agent.start()
    yield agent.address
    agent.close()


class AclAgents:
    """ACL agents made one test ahead, in a background thread.

    An ACL agent is a one-node Raft server: it spends ~1.5 s waiting for its election
    before it answers, and stopping it takes ~0.5 s. The next test's agent does that
    while this test runs, and a used one is closed in the background: every test still
    gets a fresh agent of its own, started and ready. Ports are drawn here, in the test's
    thread (tests.helpers.free_ports is not thread-safe); only start and close run in the
    background, one at a time.
    """

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="acl-agents")
        self._next: tuple[ConsulDevAgent, Future] | None = None

    def _prepare(self) -> tuple[ConsulDevAgent, Future]:
        a = ConsulDevAgent(acl=True)
        return a, self._worker.submit(a.start)

    def take(self) -> ConsulDevAgent:
        a, started = self._next or self._prepare()
        self._next = self._prepare()
        try:
            started.result()
        except BaseException:
            a.close()
            raise
        return a

    def give_back(self, a: ConsulDevAgent) -> None:
        self._worker.submit(a.close)

    def close(self) -> None:
        if self._next is not None:
            a, started = self._next
            started.add_done_callback(lambda _: a.close())
        self._worker.shutdown(wait=True)


@pytest.fixture(scope="session")
def acl_agents():
    pool = AclAgents()
    yield pool
    pool.close()


@pytest.fixture
def agent(acl_agents):
    """A Consul agent of this test alone, with ACLs (default deny) and Connect, as a
    production cluster has them; the test may stop and restart it. Started ahead of the
    test (AclAgents)."""
    a = acl_agents.take()
    yield a
    acl_agents.give_back(a)


@pytest.fixture
def plain_agent():
    """A Consul dev agent without ACLs (state in memory: a restart forgets everything)."""
    a = ConsulDevAgent()
    a.start()
    yield a
    a.close()


def pytest_terminal_summary(terminalreporter):
    """The figures the fault and bad-input tests measured (tests/figures.py), passed or not."""
    from tests.figures import FIGURES

    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
