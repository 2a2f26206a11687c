"""API fixtures: keys for alice's and charlie's owners, and a client that sends them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from apps.api.actions import create_api_key
from apps.api.models import ALL_SCOPES, ApiKey


class ApiClient:
    """Django's test client with a bearer key and JSON bodies."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.client = Client()

    def request(
        self, method: str, path: str, body: Any = None, *, idem: str | None = None, **headers: str
    ):
        extra = dict(headers)
        if self.token is not None:
            extra["HTTP_AUTHORIZATION"] = f"Bearer {self.token}"
        if idem is not None:
            extra["HTTP_IDEMPOTENCY_KEY"] = idem
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs = {"data": json.dumps(body), "content_type": "application/json"}
        return getattr(self.client, method.lower())(path, **kwargs, **extra)

    def get(self, path: str, **kw: Any):
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any):
        return self.request("POST", path, body, **kw)

    def patch(self, path: str, body: Any = None, **kw: Any):
        return self.request("PATCH", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any):
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any):
        return self.request("DELETE", path, **kw)


def make_key(owner, scopes=ALL_SCOPES, name: str = "test key") -> tuple[ApiKey, str]:
    return create_api_key(owner, name, scopes)


@pytest.fixture
def alice_key(alice_owner, alice) -> tuple[ApiKey, str]:
    return create_api_key(alice_owner, "alice integration", ALL_SCOPES, created_by=alice)


@pytest.fixture
def charlie_key(charlie_owner, charlie) -> tuple[ApiKey, str]:
    return create_api_key(charlie_owner, "charlie integration", ALL_SCOPES, created_by=charlie)


@pytest.fixture
def alice_api(alice_key) -> ApiClient:
    return ApiClient(alice_key[1])


@pytest.fixture
def charlie_api(charlie_key) -> ApiClient:
    return ApiClient(charlie_key[1])
