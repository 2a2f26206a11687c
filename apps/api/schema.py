"""The OpenAPI description: bearer security, the error shape on every operation, and the
Idempotency-Key header on every mutation (SPECTACULAR_SETTINGS names `ApiAutoSchema`)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter

from .errors import ErrorSerializer
from .idempotency import HEADER, MUTATIONS

ERROR_STATUSES = {
    "400": "Invalid request (see error.fields).",
    "401": "No, malformed, unknown or revoked API key.",
    "403": "The key lacks the scope this route needs.",
    "404": "No such object (another owner's objects do not exist for this key).",
    "409": "Conflict: an Idempotency-Key still in flight, a device offline, a duplicate.",
    "422": "This Idempotency-Key was used with a different request.",
    "429": "Rate limit reached; see Retry-After.",
}


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "apps.api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "iotp_<43 characters>_<6-character checksum>",
            "description": "An API key of an IoT owner, made on its 'API keys' tab.",
        }


class ApiAutoSchema(AutoSchema):
    def get_override_parameters(self) -> list[Any]:
        parameters = list(super().get_override_parameters())
        if self.method in MUTATIONS:
            parameters.append(
                OpenApiParameter(
                    HEADER,
                    OpenApiTypes.STR,
                    OpenApiParameter.HEADER,
                    description="Makes this request safe to retry: the same key with the same "
                    "request replays the stored response (Idempotent-Replayed: true) for 24 h.",
                )
            )
        return parameters

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if not self.path.startswith("/api/v1/") or self.path.startswith("/api/v1/schema"):
            return responses
        for status, description in ERROR_STATUSES.items():
            if status not in responses:
                response = self._get_response_for_code(
                    ErrorSerializer, status, ("application/json",), direction
                )
                response["description"] = description
                responses[status] = response
        return responses
