"""The schedule form's preview in a real Chromium: the next runs appear while typing, before
anything is saved, and errors in the expression show instead of runs."""

from __future__ import annotations

import pytest

from tests.browser import conftest as browser
from tests.browser.conftest import login

pytestmark = pytest.mark.browser

# The browser suite's fixtures: Chromium, a daphne on the test databases, a fresh page.
chromium = browser.chromium
platform_env = browser.platform_env
server = browser.server
browser_page = browser.browser_page


@pytest.fixture
def staff_alice(alice):
    alice.is_staff = True  # tenant staff log in through the admin login page
    alice.save(update_fields=["is_staff"])
    return alice


def test_the_schedule_form_previews_the_next_runs_while_typing(
    staff_alice,
    alice_lamp,
    server,
    browser_page,
):
    from playwright.sync_api import expect

    page = browser_page
    login(page, server.url, "alice", "alice-pass-123")
    page.goto(f"{server.url}/admin/schedules/schedule/add/")
    expect(page.locator("#id_timezone")).to_have_value("Europe/Berlin")  # alice's zone

    page.fill("#id_cron", "30 2 * * *")
    rows = page.locator("#schedule-preview tbody tr")
    expect(rows).to_have_count(10)
    expect(rows.first).to_contain_text("02:30")  # local time, in the schedule's zone

    page.fill("#id_timezone", "America/New_York")
    expect(page.locator("#schedule-preview thead")).to_contain_text("America/New_York")

    page.fill("#id_cron", "0 30 2 * * *")
    expect(page.locator("#schedule-preview")).to_contain_text("exactly 5 fields")
    expect(rows).to_have_count(0)
    assert not page.url.endswith("/change/")  # nothing was saved
