"""What the calling key may do: its owner, its scopes, and its limits."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, views
from rest_framework.request import Request
from rest_framework.response import Response

from ..base import ApiViewMixin
from ..models import ALL_SCOPES


class KeyInfoSerializer(serializers.Serializer):
    name = serializers.CharField()
    prefix = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)


class OwnerInfoSerializer(serializers.Serializer):
    name = serializers.CharField()
    slug = serializers.CharField()
    timezone = serializers.CharField()


class LimitsSerializer(serializers.Serializer):
    per_key = serializers.IntegerField()
    per_owner = serializers.IntegerField()
    window_seconds = serializers.IntegerField()
    idempotency_hours = serializers.FloatField()


class RetentionSerializer(serializers.Serializer):
    telemetry_days = serializers.IntegerField(
        allow_null=True, help_text="Telemetry older than this is deleted; null: kept forever."
    )
    history_days = serializers.IntegerField(
        allow_null=True,
        help_text="Transitions, finished commands and schedule runs; null: kept forever.",
    )


class CapabilitiesSerializer(serializers.Serializer):
    key = KeyInfoSerializer()
    owner = OwnerInfoSerializer()
    scopes = serializers.ListField(child=serializers.CharField())
    allowed = serializers.DictField(
        child=serializers.BooleanField(), help_text="Every scope, and whether this key has it."
    )
    rate_limit = LimitsSerializer()
    retention = RetentionSerializer(help_text="How far back queries can reach.")


@extend_schema(tags=["capabilities"])
class CapabilitiesView(ApiViewMixin, views.APIView):
    scopes = {"GET": ()}  # any valid key may ask what it may do

    @extend_schema(responses=CapabilitiesSerializer)
    def get(self, request: Request) -> Response:
        key = self.client.key
        data: dict[str, Any] = {
            "key": {
                "name": key.name,
                "prefix": key.prefix,
                "created_at": key.created_at,
                "last_used_at": key.last_used_at,
            },
            "owner": {
                "name": key.owner.name,
                "slug": key.owner.slug,
                "timezone": key.owner.timezone,
            },
            "scopes": sorted(key.scopes or []),
            "allowed": {scope: scope in (key.scopes or []) for scope in ALL_SCOPES},
            "rate_limit": {
                "per_key": settings.API_RATE_PER_KEY,
                "per_owner": settings.API_RATE_PER_OWNER,
                "window_seconds": settings.API_RATE_WINDOW_SECONDS,
                "idempotency_hours": settings.API_IDEMPOTENCY_TTL_HOURS,
            },
            "retention": {
                "telemetry_days": settings.TELEMETRY_RETENTION_DAYS or None,
                "history_days": settings.HISTORY_RETENTION_DAYS or None,
            },
        }
        return Response(CapabilitiesSerializer(data).data)
