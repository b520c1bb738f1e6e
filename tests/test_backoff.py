from supervisor.backoff import Backoff
from supervisor.config import RestartPolicy


def test_delays_double_up_to_the_cap_then_fatal():
    backoff = Backoff(RestartPolicy(backoff_initial=0.5, backoff_max=4, max_retries=6, stable_after=10))
    delays = [backoff.record_exit(ran_for=0.1) for _ in range(7)]
    assert delays == [0.5, 1, 2, 4, 4, 4, None]


def test_a_stable_run_resets_the_count():
    backoff = Backoff(RestartPolicy(backoff_initial=1, backoff_max=30, max_retries=3, stable_after=10))
    assert [backoff.record_exit(0.1) for _ in range(3)] == [1, 2, 4]
    assert backoff.record_exit(ran_for=60) == 1  # ran long enough: a fresh start
    assert backoff.record_exit(0.1) == 2


def test_defaults_give_about_half_a_minute_before_fatal():
    backoff = Backoff(RestartPolicy())
    delays = []
    while (delay := backoff.record_exit(0)) is not None:
        delays.append(delay)
    assert delays == [0.5, 1, 2, 4, 8, 16]
