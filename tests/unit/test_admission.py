"""Tests for relay_server/admission.py: the relay's admission policy, with explicit time."""

from __future__ import annotations

import pytest

from relay_server import admission
from relay_server.admission import (
    REFUSED_FAILURES,
    REFUSED_FULL,
    REFUSED_PENDING,
    REFUSED_RATE,
    Admission,
    AdmissionError,
)


def test_admits_until_full_then_refuses_and_counts() -> None:
    policy = Admission(max_clients=2, max_pending=10)
    assert policy.connect("192.0.2.1", 0.0, clients=1) is None
    refusal = policy.connect("192.0.2.1", 0.0, clients=2)
    assert refusal is not None and refusal.reason == REFUSED_FULL and "full" in refusal.message
    assert policy.refused[REFUSED_FULL] == 1 and policy.pending == 1


def test_pending_logins_are_bounded_and_released() -> None:
    policy = Admission(max_pending=2)
    assert policy.connect("192.0.2.1", 0.0, clients=0) is None
    assert policy.connect("192.0.2.2", 0.0, clients=0) is None
    refusal = policy.connect("192.0.2.3", 0.0, clients=0)
    assert refusal is not None and refusal.reason == REFUSED_PENDING
    policy.login_ended("192.0.2.1", 1.0, failed=False)
    assert policy.pending == 1
    assert policy.connect("192.0.2.3", 1.0, clients=1) is None


def test_failed_logins_turn_an_address_away_for_the_window_only() -> None:
    policy = Admission(failure_limit=3, failure_window=10.0)
    for t in (0.0, 1.0, 2.0):
        assert policy.connect("192.0.2.9", t, clients=0) is None
        policy.login_ended("192.0.2.9", t, failed=True)
    refusal = policy.connect("192.0.2.9", 5.0, clients=0)
    assert refusal is not None and refusal.reason == REFUSED_FAILURES
    assert "3 failed logins from 192.0.2.9" in refusal.message and "try again in 5 s" in refusal.message
    assert policy.connect("198.51.100.1", 5.0, clients=0) is None  # other addresses are not affected
    assert policy.connect("192.0.2.9", 10.5, clients=0) is None  # the first failure has aged out
    assert policy.refused == {REFUSED_FULL: 0, REFUSED_PENDING: 0, REFUSED_FAILURES: 1, REFUSED_RATE: 0}


def test_once_an_address_failed_its_logins_in_progress_count_against_the_limit() -> None:
    policy = Admission(failure_limit=3, failure_window=10.0)
    # A clean address may have any number of logins in progress (a NAT of honest clients)...
    for _ in range(5):
        assert policy.connect("192.0.2.9", 0.0, clients=0) is None
    # ...but once one failed, failures plus logins still in flight may not exceed the limit, or an
    # attacker with many logins in flight at once would get that many more failures than allowed.
    policy.login_ended("192.0.2.9", 1.0, failed=True)  # 1 failed, 4 in flight
    refusal = policy.connect("192.0.2.9", 1.0, clients=0)
    assert refusal is not None and refusal.reason == REFUSED_FAILURES
    assert "1 failed logins from 192.0.2.9 in 10 s and 4 more logging in" in refusal.message
    for _ in range(3):
        policy.login_ended("192.0.2.9", 2.0, failed=False)  # 1 failed, 1 in flight
    assert policy.connect("192.0.2.9", 2.0, clients=0) is None  # 1 failed, 2 in flight
    assert policy.connect("192.0.2.9", 2.0, clients=0) is not None
    policy.login_ended("192.0.2.9", 3.0, failed=True)
    policy.login_ended("192.0.2.9", 3.0, failed=True)  # 3 failed, none in flight: the limit, exactly
    assert policy.connect("192.0.2.9", 3.0, clients=0) is not None
    assert policy._in_flight == {} and policy.pending == 0
    assert policy.connect("192.0.2.9", 11.5, clients=0) is None  # the window passed


def test_successful_logins_do_not_count_against_an_address() -> None:
    policy = Admission(failure_limit=1)
    for t in range(100):
        assert policy.connect("192.0.2.9", float(t), clients=0) is None
        policy.login_ended("192.0.2.9", float(t), failed=False)


def test_tracked_addresses_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "MAX_TRACKED_ADDRESSES", 4)
    policy = Admission(failure_limit=1, failure_window=100.0)
    for n in range(10):
        ip = f"192.0.2.{n}"
        assert policy.connect(ip, 0.0, clients=0) is None
        policy.login_ended(ip, 0.0, failed=True)
    assert len(policy._failures) == 4
    assert policy.connect("192.0.2.9", 1.0, clients=0) is not None  # the newest are remembered
    assert policy.connect("192.0.2.0", 1.0, clients=0) is None  # the oldest were forgotten


@pytest.mark.parametrize(
    "limits",
    [{"max_clients": 0}, {"max_pending": 0}, {"failure_limit": 0}, {"failure_window": 0.0}],
)
def test_limits_must_be_positive(limits: dict[str, float]) -> None:
    with pytest.raises(AdmissionError):
        Admission(**limits)  # type: ignore[arg-type]
