"""Each scope × each route: allowed or 403, exactly as the table in docs/api.md says.

The table is parsed from the document, so the document and the code cannot drift apart: a route
missing from the table, a row for a route that does not exist, or a scope that behaves otherwise
than documented fails here.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from drf_spectacular.generators import SchemaGenerator

from apps.api.models import ALL_SCOPES
from apps.forwarding import kinds

from .conftest import ApiClient, make_key
from .world import Side, build_side

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (GET|POST|PUT|PATCH|DELETE) \| `(/api/v1/[^`]*)` \| ([^|]+) \|$")


def documented() -> list[tuple[str, str, frozenset[str] | None]]:
    """(method, path, scopes) rows; scopes None = any key. `{kind}` expanded per kind."""
    rows = []
    for line in (ROOT / "docs" / "api.md").read_text().splitlines():
        match = ROW.match(line.strip())
        if not match:
            continue
        method, path, cell = match.groups()
        cell = cell.strip()
        scopes = None if cell == "any key" else frozenset(s.strip() for s in cell.split(","))
        for kind in kinds.KINDS if "{kind}" in path else [None]:
            rows.append((method, path.replace("{kind}", kind) if kind else path, scopes))
    return rows


ROWS = documented()


def served() -> set[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if path.startswith("/api/v1/") and method in ("get", "post", "put", "patch", "delete")
    }


def test_the_table_lists_every_route_and_only_routes_that_exist():
    table = {(method, path) for method, path, _ in ROWS}
    assert len(ROWS) > 30  # the parser found the table
    assert table - served() == set(), "documented but not served"
    assert served() - table == set(), "served but not documented"


def test_every_scope_allows_something():
    used = set().union(*(s for *_, s in ROWS if s))
    assert used == set(ALL_SCOPES)


ID_OWNERS = {
    "/api/v1/commands/{id}": "command",
    "/api/v1/groups/{id}": "group",
    "/api/v1/schedules/{id}": "schedule",
    "/api/v1/deliveries/{id}": "delivery",
    "/api/v1/destinations/webhook/{id}": "destination",
    "/api/v1/destinations/{id}": "destination",
}


def _fill(path: str, side: Side) -> str:
    ids = side.ids()
    path = path.replace("{device_id}", ids["device"])
    for prefix, key in ID_OWNERS.items():
        if path.startswith(prefix):
            return path.replace("{id}", ids[key])
    # Other kinds' objects: a well-formed id of nothing (scopes are checked before lookups).
    return path.replace("{id}", str(uuid.uuid4()))


def _body(method: str, path: str, side: Side) -> dict | None:
    if method in ("GET", "DELETE"):
        return None
    if path.endswith("/commands/"):
        return {"action": "NOT-A-COMMAND"}  # passes the scope, refused before any publish
    if path == "/api/v1/devices/":
        return {"device_id": f"new-{uuid.uuid4().hex[:8]}", "profile": "esp32-lamp"}
    if path.startswith("/api/v1/devices/"):
        return {"name": "renamed"}
    if path.startswith("/api/v1/schedules"):
        return {
            "name": f"s-{uuid.uuid4().hex[:6]}",
            "device": side.lamp.device_id,
            "action": "OFF",
            "cron": "0 23 * * *",
            "timezone": "Europe/Berlin",
        }
    if path.endswith("/replay/"):
        return {"deliveries": [side.delivery.pk]}
    if path.endswith("/test/"):
        return None
    return {"name": "renamed", "url": "https://hooks.example.net/x"}


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "path", "allowed"), ROWS, ids=[f"{m} {p}" for m, p, _ in ROWS])
def test_scope_matrix(method, path, allowed, alice_owner, monkeypatch):
    from apps.forwarding.kinds import TestResult

    # Test Connection would go out to the network; the scope check is what is tested here.
    monkeypatch.setattr(
        "apps.forwarding.actions.test_destination", lambda d: TestResult(False, "not sent")
    )
    side = build_side(alice_owner, "alice")
    url = _fill(path, side)
    body = _body(method, path, side)
    results = {}
    for scope in [*ALL_SCOPES, None]:
        _key, token = make_key(alice_owner, [scope] if scope else [], name=f"only {scope}")
        response = ApiClient(token).request(method, url, body)
        results[scope] = response.status_code
        expected_ok = allowed is None or (scope is not None and scope in allowed)
        if expected_ok:
            assert response.status_code not in (401, 403), (scope, response.content[:300])
        else:
            assert response.status_code == 403, (scope, response.status_code, response.content)
            assert response.json()["error"]["code"] == "permission_denied"
