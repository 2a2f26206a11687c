"""What every API view is made of: key auth, scopes, rate limit, idempotency, owner scoping.

Every view of `apps.api` derives from `ApiViewMixin` (the isolation and scope-matrix tests
check it), declares `scopes` (action or HTTP method -> scope; a missing entry is a refusal) and
builds its querysets with `scoped(...)`, which goes through `apps.owners.scoping`.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model, QuerySet
from django.http import HttpResponse
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.owners.scoping import scope

from . import idempotency
from .auth import ApiClient, ApiKeyAuthentication, ApiRateThrottle, HasScope, client_of


class ApiViewMixin:
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [HasScope]
    throttle_classes = [ApiRateThrottle]
    renderer_classes = [JSONRenderer]
    parser_classes = [JSONParser]
    # action (viewsets) or HTTP method -> scope, or a tuple of scopes (any one), or () for any key.
    scopes: dict[str, str | tuple[str, ...]] = {}
    # Run mutations with an Idempotency-Key inside one transaction with the stored response.
    idempotent_atomic = True

    request: Request

    # -- helpers for views -----------------------------------------------------------------

    @property
    def client(self) -> ApiClient:
        return client_of(self.request)

    def scoped(self, qs: QuerySet | type[Model], field: str = "owner") -> QuerySet:
        """Rows of the key's owner only (the one scoping rule, as everywhere)."""
        if not isinstance(qs, QuerySet):
            qs = qs._default_manager.all()
        return scope(qs, self.request.user, field=field)

    # -- the request cycle -----------------------------------------------------------------

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponse:
        """DRF's `APIView.dispatch`, with the idempotency claim between the checks (auth, scope,
        rate limit) and the handler: a refused request never uses up an idempotency key."""
        self.args, self.kwargs = args, kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            self.initial(request, *args, **kwargs)
            method = request.method.lower()
            handler = (
                getattr(self, method, self.http_method_not_allowed)
                if method in self.http_method_names
                else self.http_method_not_allowed
            )
            key = idempotency.key_of(request)
            if key is None:
                response = handler(request, *args, **kwargs)
            else:
                response = self._idempotent(request, key, handler, args, kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response

    def _idempotent(
        self, request: Request, key: str, handler: Any, args: tuple, kwargs: dict
    ) -> HttpResponse:
        client = self.client
        outcome = idempotency.begin(
            request,
            key,
            owner_id=client.owner_id,
            api_key_id=client.key.pk,
            atomic=self.idempotent_atomic,
        )
        if not isinstance(outcome, idempotency.Claim):
            return outcome  # a replay

        def execute() -> HttpResponse:
            try:
                response = handler(request, *args, **kwargs)
            except Exception as exc:
                response = self.handle_exception(exc)
            response = self.finalize_response(request, response, *args, **kwargs)
            if isinstance(response, Response):
                response.render()  # the stored body is the rendered one
            return response

        return idempotency.run(outcome, execute, atomic=self.idempotent_atomic)

    def finalize_response(
        self, request: Request, response: Any, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        if isinstance(response, Response) and response.status_code >= 400:
            # Errors are JSON whatever was negotiated (the CSV export's errors too).
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        window = getattr(request, "rate_window", None)
        if window is not None and not response.has_header("RateLimit-Limit"):
            response["RateLimit-Limit"] = str(window.limit)
            response["RateLimit-Remaining"] = str(window.remaining)
            response["RateLimit-Reset"] = str(window.retry_after())
        return response
