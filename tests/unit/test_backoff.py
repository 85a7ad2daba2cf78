from __future__ import annotations

from init.core.backoff import SERVICE_RESTART, Backoff


def test_delay_doubles_up_to_the_cap() -> None:
    policy = Backoff(first=0.5, factor=2.0, cap=5.0, reset_after=10.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_no_quick_exit_no_delay() -> None:
    assert SERVICE_RESTART.delay(0) == 0.0


def test_a_long_run_is_not_quick() -> None:
    assert SERVICE_RESTART.is_quick(0.2)
    assert not SERVICE_RESTART.is_quick(SERVICE_RESTART.reset_after)


def test_a_crash_loop_never_restarts_faster_than_the_cap_allows() -> None:
    delays = [SERVICE_RESTART.delay(n) for n in range(1, 50)]
    assert delays == sorted(delays)
    assert max(delays) == SERVICE_RESTART.cap
