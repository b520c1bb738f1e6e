from __future__ import annotations

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


@pytest.fixture
def agent():
    """A Consul agent of this test alone, with ACLs (default deny) and Connect, as a
    production cluster has them; the test may stop and restart it."""
    a = ConsulDevAgent(acl=True)
    a.start()
    yield a
    a.close()


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
