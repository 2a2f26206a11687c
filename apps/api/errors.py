"""One JSON error shape for every API response that is not a success:

    {"error": {"status": 404, "code": "not_found", "message": "No such object.",
               "fields": {"name": ["This field is required."]}}}

`code` is stable (clients branch on it), `message` is for people, `fields` only appears for
validation errors (field name -> messages; "non_field_errors" for the request as a whole).
Unexpected exceptions become a 500 of the same shape; the traceback goes to the log only.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import set_rollback

log = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state."
    default_code = "conflict"


class Unprocessable(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "The request cannot be processed."
    default_code = "unprocessable"


# DRF's codes are kept (not_found, permission_denied, not_authenticated, authentication_failed,
# method_not_allowed, parse_error, …) except where a plainer name reads better.
RENAMED = {"throttled": "rate_limited", "error": ""}
# Codes for exceptions that carry none.
STATUS_CODES = {
    400: "invalid",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "server_error",
}


def error_body(
    status_code: int, code: str, message: str, fields: dict[str, Any] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status_code, "code": code, "message": message}
    if fields:
        error["fields"] = fields
    return {"error": error}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every exception of an API view becomes the error shape."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound("No such object.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        # Model validation (full_clean in actions) reported through the API.
        exc = exceptions.ValidationError(as_serializer_error(exc))

    if not isinstance(exc, exceptions.APIException):
        log.exception("unhandled error in API view %s", type(context.get("view")).__name__)
        set_rollback()
        return Response(
            error_body(500, "server_error", "Internal error; it has been logged."),
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )

    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))

    fields = None
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        fields = _as_strings(detail)
        code, message = "invalid", "The request is invalid; see fields."
    else:
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else ""
        code = RENAMED.get(code, code) or STATUS_CODES.get(exc.status_code, "error")
        message = str(exc.detail)
    set_rollback()
    body = error_body(exc.status_code, code, message, fields)
    return Response(body, exc.status_code, headers=headers)


def _as_strings(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {str(k): _as_strings(v) for k, v in detail.items()}
    if isinstance(detail, list):
        return [_as_strings(v) for v in detail]
    return str(detail)


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Unknown paths under /api/: the same shape as every other error, not Django's HTML."""
    return JsonResponse(error_body(404, "not_found", "No such route."), status=404)


# --- the shape in the OpenAPI schema ------------------------------------------------------------


class ErrorDetailSerializer(serializers.Serializer):
    status = serializers.IntegerField()
    code = serializers.CharField()
    message = serializers.CharField()
    fields = serializers.DictField(child=serializers.JSONField(), required=False)


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()
