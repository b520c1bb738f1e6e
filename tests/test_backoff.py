from shared.backoff import Backoff, CrashBackoff
from supervisor.config import RestartPolicy


def crash_backoff(policy: RestartPolicy) -> CrashBackoff:
    return CrashBackoff(policy.backoff_initial, policy.backoff_max, policy.max_retries, policy.stable_after)


def test_delays_double_up_to_the_cap_then_fatal():
    backoff = crash_backoff(RestartPolicy(backoff_initial=0.5, backoff_max=4, max_retries=6, stable_after=10))
    delays = [backoff.record_exit(ran_for=0.1) for _ in range(7)]
    assert delays == [0.5, 1, 2, 4, 4, 4, None]


def test_a_stable_run_resets_the_count():
    backoff = crash_backoff(RestartPolicy(backoff_initial=1, backoff_max=30, max_retries=3, stable_after=10))
    assert [backoff.record_exit(0.1) for _ in range(3)] == [1, 2, 4]
    assert backoff.record_exit(ran_for=60) == 1  # ran long enough: a fresh start
    assert backoff.record_exit(0.1) == 2


def test_defaults_give_about_half_a_minute_before_fatal():
    backoff = crash_backoff(RestartPolicy())
    delays = []
    while (delay := backoff.record_exit(0)) is not None:
        delays.append(delay)
    assert delays == [0.5, 1, 2, 4, 8, 16]


def test_plain_backoff_doubles_to_the_cap_and_resets():
    backoff = Backoff(0.1, 1.0)
    assert [backoff.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.1
    assert backoff.delay(10_000) == 1.0  # no overflow however long it failed
