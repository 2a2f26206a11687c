"""Browser login brute-force protection, per account and per address, on the real admin login."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

pytestmark = pytest.mark.django_db

LOGIN = reverse("admin:login")


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 3
    settings.LOGIN_FAILURES_PER_ADDRESS = 5
    settings.LOGIN_LOCKOUT_SECONDS = 900


def attempt(username: str, password: str, address: str = "203.0.113.7") -> tuple[int, str, bool]:
    client = Client(REMOTE_ADDR=address)
    response = client.post(LOGIN, {"username": username, "password": password})
    return response.status_code, response.content.decode(), "_auth_user_id" in client.session


def test_an_account_is_locked_after_its_failures_even_with_the_right_password(alice):
    for _ in range(3):
        status, body, logged_in = attempt("alice", "wrong")
        assert not logged_in and "Too many failed logins" not in body
    status, body, logged_in = attempt("alice", "alice-pass-123")
    assert not logged_in
    assert "Too many failed logins" in body
    # From another address too: the lock is on the account.
    assert not attempt("alice", "alice-pass-123", address="198.51.100.9")[2]


def test_the_lock_counts_names_that_do_not_exist_alike(db):
    for _ in range(3):
        attempt("nobody-by-this-name", "guess")
    assert "Too many failed logins" in attempt("nobody-by-this-name", "guess")[1]


def test_an_address_is_locked_after_failures_across_accounts(alice, bob):
    for n in range(5):
        attempt(f"someone-{n}", "guess")
    status, body, logged_in = attempt("bob", "bob-pass-123")
    assert not logged_in and "Too many failed logins" in body
    # Another address is not affected.
    assert attempt("bob", "bob-pass-123", address="198.51.100.9")[2]


def test_successful_logins_are_not_counted(alice):
    for _ in range(5):
        assert attempt("alice", "alice-pass-123", address="192.0.2.1")[2]


def test_the_lock_ends_with_its_window(alice, settings):
    from apps.api.models import RateCounter

    for _ in range(3):
        attempt("alice", "wrong")
    assert not attempt("alice", "alice-pass-123")[2]
    # The window passes (its rows are what the cleanup task deletes).
    RateCounter.objects.all().delete()
    assert attempt("alice", "alice-pass-123")[2]


def test_a_lock_taken_just_before_a_window_boundary_lasts_its_full_length(alice, monkeypatch):
    from apps.api import login_throttle

    boundary = 1_800_000_000  # a multiple of the 900 s window
    clock = [boundary - 2.0]
    monkeypatch.setattr(login_throttle, "_now", lambda: clock[0])
    for _ in range(3):
        attempt("alice", "wrong")
    clock[0] = boundary + 1.0  # the failures' window has ended; the lock has not
    status, body, logged_in = attempt("alice", "alice-pass-123")
    assert not logged_in and "Try again in 15 minutes" in body
    clock[0] = boundary + 897.0  # 2 s of the lock left
    assert "Try again in 1 minute." in attempt("alice", "alice-pass-123")[1]
    clock[0] = boundary - 2.0 + 900.0  # the lock ends 900 s after the failure that took it
    assert attempt("alice", "alice-pass-123")[2]


def test_a_lock_is_extended_never_shortened_and_cleaned_up_when_it_ends(db):
    from apps.api import ratelimit

    assert ratelimit.locked_until("b", now=1000.0) is None
    assert ratelimit.lock("b", 900, now=1000.0) == 1900
    assert ratelimit.lock("b", 60, now=1100.0) == 1900  # a shorter lock does not cut it short
    assert ratelimit.lock("b", 900, now=1500.0) == 2400
    assert ratelimit.locked_until("b", now=2399.0) == 2400
    assert ratelimit.locked_until("b", now=2400.0) is None
    assert ratelimit.delete_expired(now=2401.0) == 1
    assert ratelimit.lock("b", 900, now=3000.0) == 3900  # a new lock after the cleanup
