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
