"""Property-based run of the served OpenAPI schema against a real daphne, with a valid key.

Schemathesis generates requests from `/api/v1/schema/` for every operation; every answer must be
free of server errors and conform to the schema (documented status, content type and body).
Bounded (MAX_EXAMPLES per operation) so that CI stays fast; raise it locally to dig deeper.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from apps.api.actions import create_api_key
from apps.api.models import ALL_SCOPES

from .servers import web_servers
from .world import build_side

pytestmark = pytest.mark.django_db(transaction=True)

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "8"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_the_served_schema_holds_for_generated_requests(alice_owner, tmp_path):
    build_side(alice_owner, "alice")  # some real rows to find, list and page through
    _key, token = create_api_key(alice_owner, "schemathesis", ALL_SCOPES)
    env = {"API_RATE_PER_KEY": "100000", "API_RATE_PER_OWNER": "100000"}
    failures: list[str] = []
    with web_servers(1, tmp_path, **env) as (server,):
        schema = schemathesis.openapi.from_url(f"{server.url}/api/v1/schema/?format=json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) > 30

        for operation in operations:

            @given(case=operation.as_strategy())
            @hypothesis_settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case) -> None:
                headers = {"Authorization": f"Bearer {token}"}
                response = case.call(base_url=server.url, headers=headers)
                case.validate_response(response, checks=CHECKS, headers=headers)

            try:
                exercise()
            except Exception as exc:  # collect all operations' failures, not just the first
                failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
