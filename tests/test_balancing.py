"""The balancer (shared/mesh/balancing.py): power of two choices on in-flight requests, with
temporary ejection of instances that keep failing and a panic mode when all are ejected."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

import shared.mesh.balancing as balancing
from shared.mesh.balancing import Backend, Balancer, Lease


@pytest.fixture
def seeded(monkeypatch):
    """Deterministic picks: the balancer draws from its own seeded generator."""
    monkeypatch.setattr(balancing, "random", random.Random(20240611))


def make(n: int, **kw) -> Balancer:
    b = Balancer("svc", **kw)
    b.update([(f"k{i}", "127.0.0.1", 9000 + i, {"index": str(i)}) for i in range(n)])
    return b


def picks(b: Balancer, n: int, exclude=()) -> Counter:
    return Counter(b.pick(exclude).key for _ in range(n))


class FakeConn:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_nothing_to_pick_from():
    b = Balancer("svc")
    assert b.pick() is None and not b.known and b.ejected() == 0
    b.update([])
    assert b.known  # an empty answer from discovery is still an answer
    assert b.pick() is None


def test_backend_basics():
    backend = Backend("k", "10.0.0.1", 8080)
    assert backend.address == "10.0.0.1:8080"
    assert backend.meta == {} and backend.inflight == 0 and backend.failures == 0 and backend.idle == []
    assert "10.0.0.1:8080" in repr(backend)


def test_single_instance_is_always_picked():
    b = make(1)
    (only,) = b.backends
    assert all(b.pick() is only for _ in range(20))
    only.ejected_until = time.monotonic() + 60
    assert b.pick() is only  # ejected, but the only one: still used
    assert b.pick((only,)) is None


def test_exclude_is_honoured(seeded):
    b = make(3)
    k0, k1, k2 = b.backends
    assert picks(b, 200, (k0, k1)) == {"k2": 200}
    assert set(picks(b, 200, (k0,))) == {"k1", "k2"}
    assert b.pick((k0, k1, k2)) is None


def test_equal_load_spreads_evenly(seeded):
    b = make(3)
    counts = picks(b, 3000)
    assert set(counts) == {"k0", "k1", "k2"}
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_two_choices_prefer_fewer_requests_in_flight(seeded):
    b = make(2)
    b.backends[0].inflight = 1
    assert picks(b, 200) == {"k1": 200}  # with two instances both are always compared

    b = make(3)
    b.backends[0].inflight, b.backends[1].inflight, b.backends[2].inflight = 10, 5, 0
    counts = picks(b, 3000)
    # Of the three equally likely pairs the busiest never wins one, the idlest wins two.
    assert counts["k0"] == 0
    assert 1800 <= counts["k2"] <= 2200 and 800 <= counts["k1"] <= 1200, counts


def test_two_choices_ignore_excluded_instances(seeded):
    b = make(3)
    k0, k1, k2 = b.backends
    k2.inflight = 0
    k1.inflight = 100
    assert picks(b, 100, (k2,)) == {"k0": 100}


def test_consecutive_failures_eject(seeded):
    b = make(3, eject_after=3, eject_for=60)
    k0 = b.backends[0]
    b.failed(k0)
    b.failed(k0)
    b.succeeded(k0)  # a success resets the count
    b.failed(k0)
    b.failed(k0)
    assert k0.failures == 2 and b.ejected() == 0
    assert "k0" in picks(b, 300)
    before = time.monotonic()
    b.failed(k0)
    assert b.ejected() == 1 and k0.failures == 0
    assert before + 59 < k0.ejected_until <= time.monotonic() + 60
    assert set(picks(b, 300)) == {"k1", "k2"}


def test_ejection_ends_after_eject_for(seeded):
    b = make(2, eject_after=1, eject_for=0.2)
    k0 = b.backends[0]
    b.failed(k0)
    assert set(picks(b, 50)) == {"k1"}
    time.sleep(0.3)
    assert b.ejected() == 0
    assert "k0" in picks(b, 50)


def test_all_ejected_still_serve(seeded):
    b = make(3, eject_after=1, eject_for=60)
    for backend in b.backends:
        b.failed(backend)
    assert b.ejected() == 3
    assert set(picks(b, 300)) == {"k0", "k1", "k2"}  # panic mode: everyone rather than no one
    k0, k1, k2 = b.backends
    assert picks(b, 50, (k0, k1)) == {"k2": 50}
    assert b.pick((k0, k1, k2)) is None


def test_healthy_preferred_over_ejected_then_ejected_when_nothing_else(seeded):
    b = make(3, eject_after=1, eject_for=60)
    k0, k1, k2 = b.backends
    b.failed(k0)
    b.failed(k1)
    assert picks(b, 100) == {"k2": 100}
    # the healthy one was tried already: the ejected ones are better than nothing
    assert set(picks(b, 100, (k2,))) == {"k0", "k1"}


def test_update_keeps_the_state_of_instances_that_stay():
    b = make(3)
    k0, k1, k2 = b.backends
    k0.inflight, k0.failures, k0.ejected_until = 4, 2, 123.0
    kept, dropped = FakeConn(), FakeConn()
    k0.idle.append(kept)
    k1.idle.append(dropped)

    b.update([("k0", "127.0.0.1", 9000, {"version": "2"}), ("k2", "127.0.0.1", 9002, {}),
              ("k3", "127.0.0.1", 9003, {})])
    assert [x.key for x in b.backends] == ["k0", "k2", "k3"]
    assert b.backends[0] is k0 and b.backends[1] is k2
    assert (k0.inflight, k0.failures, k0.ejected_until) == (4, 2, 123.0)
    assert k0.meta == {"version": "2"}
    assert k0.idle == [kept] and not kept.closed and not k0.removed
    assert k1.removed and dropped.closed and k1.idle == []  # its pooled connections go
    assert b.backends[2].inflight == 0 and not b.backends[2].removed


def test_update_with_a_new_address_is_a_new_instance():
    b = make(1)
    old = b.backends[0]
    conn = FakeConn()
    old.idle.append(conn)
    old.failures = 2
    b.update([("k0", "127.0.0.1", 9999, {})])
    new = b.backends[0]
    assert new is not old and new.address == "127.0.0.1:9999" and new.failures == 0
    assert old.removed and conn.closed and old.idle == []


def test_update_to_empty_removes_everything():
    b = make(2)
    conns = [FakeConn(), FakeConn()]
    for backend, conn in zip(b.backends, conns):
        backend.idle.append(conn)
    olds = list(b.backends)
    b.update([])
    assert b.backends == [] and b.pick() is None
    assert all(o.removed for o in olds) and all(c.closed for c in conns)


# -- leases: the only way the relay changes an instance's counts ----------------------


def test_a_lease_holds_an_instance_until_it_is_settled_once():
    b = make(1, eject_after=2, eject_for=60)
    (k0,) = b.backends
    lease = Lease()
    for settle in (lease.succeeded, lease.failed, lease.released):
        assert lease.take(b, k0) is lease and k0.inflight == 1
        settle()
        assert k0.inflight == 0
        for again in (lease.succeeded, lease.failed, lease.released):
            again()  # settling again is a no-op
        assert k0.inflight == 0
    assert k0.failures == 1 and b.ejected() == 0  # the one failure; the repeats counted nothing


def test_a_success_resets_the_failures_and_a_release_gives_no_verdict():
    b = make(1, eject_after=3)
    (k0,) = b.backends
    lease = Lease()
    lease.take(b, k0).failed()
    lease.take(b, k0).failed()
    lease.take(b, k0).released()
    assert k0.failures == 2
    lease.take(b, k0).succeeded()
    assert k0.failures == 0 and k0.inflight == 0


def test_a_lease_is_not_taken_again_before_it_is_settled():
    b = make(2)
    k0, k1 = b.backends
    lease = Lease().take(b, k0)
    with pytest.raises(RuntimeError):
        lease.take(b, k1)
    assert (k0.inflight, k1.inflight) == (1, 0)
