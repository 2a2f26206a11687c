"""Devices: CRUD, live state, transitions; telemetry by time range with a streamed CSV export."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.devices import live
from apps.devices.models import DEVICE_ID_RE, Device, EventKind, Telemetry, Transition

from ..base import ApiViewMixin
from ..errors import Conflict
from ..models import Scope
from ..pagination import cursor_by

DEVICE_LOOKUP = DEVICE_ID_RE.strip("^$")
EXPORT_CHUNK = 2000


# --- serializers ------------------------------------------------------------------------------

STATE_FIELDS = (
    "connection",
    "connection_changed_at",
    "power",
    "last_seen_at",
    "last_reading",
    "last_reading_at",
    "firmware",
    "device_type",
    "ip_address",
    "rssi",
    "uptime",
    "seq_gaps",
    "created_at",
)


class DeviceSerializer(serializers.ModelSerializer):
    power = serializers.DictField(child=serializers.CharField(), read_only=True)
    last_reading = serializers.DictField(child=serializers.JSONField(), read_only=True)
    topic = serializers.CharField(
        max_length=63,
        required=False,
        allow_blank=True,
        help_text="Blank: the device id. Tasmota: the device's own Topic setting.",
    )

    class Meta:
        model = Device
        fields = (
            "device_id",
            "name",
            "location",
            "profile",
            "topic",
            "topic_order",
            "relay_count",
            "expected_interval",
            "offline_policy",
            *STATE_FIELDS,
        )
        read_only_fields = STATE_FIELDS
        # Uniqueness is checked by the model (full_clean) and the database; DRF's
        # UniqueTogetherValidator would make the optional `topic` required.
        validators: list = []


class DeviceUpdateSerializer(DeviceSerializer):
    """The id and profile fix the device's topics; the owner is fixed anyway: read-only."""

    class Meta(DeviceSerializer.Meta):
        read_only_fields = ("device_id", "profile", *STATE_FIELDS)


class DeviceStateSerializer(serializers.Serializer):
    """The live shape (the same dict the live pages' WebSocket sends)."""

    id = serializers.IntegerField()
    device_id = serializers.CharField()
    name = serializers.CharField()
    location = serializers.CharField(allow_blank=True)
    profile = serializers.CharField()
    profile_label = serializers.CharField()
    owner_id = serializers.IntegerField()
    connection = serializers.CharField()
    connection_changed_at = serializers.DateTimeField(allow_null=True)
    relays = serializers.ListField(child=serializers.IntegerField())
    power = serializers.DictField(child=serializers.CharField())
    last_reading = serializers.DictField(child=serializers.JSONField())
    last_reading_at = serializers.DateTimeField(allow_null=True)
    last_seen_at = serializers.DateTimeField(allow_null=True)
    firmware = serializers.CharField(allow_blank=True)
    device_type = serializers.CharField(allow_blank=True)
    ip = serializers.CharField(allow_blank=True)
    rssi = serializers.IntegerField(allow_null=True)
    uptime = serializers.CharField(allow_blank=True)
    seq_gaps = serializers.IntegerField()


class TransitionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Transition
        fields = ("id", "kind", "relay", "old", "new", "cause", "at")


class TelemetrySerializer(serializers.ModelSerializer):
    data = serializers.JSONField()

    class Meta:
        model = Telemetry
        fields = ("id", "kind", "ts", "received_at", "seq", "topic", "data")


# --- query parameters -------------------------------------------------------------------------


class RangeQuery(serializers.Serializer):
    since = serializers.DateTimeField(required=False, help_text="Inclusive, ISO 8601.")
    until = serializers.DateTimeField(required=False, help_text="Exclusive, ISO 8601.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("since") and attrs.get("until") and attrs["until"] <= attrs["since"]:
            raise serializers.ValidationError({"until": ["Must be after since."]})
        return attrs


class TelemetryQuery(RangeQuery):
    kind = serializers.ChoiceField(choices=EventKind.choices, required=False)


RANGE_PARAMS = [
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="Inclusive, ISO 8601."),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="Exclusive, ISO 8601."),
]
TELEMETRY_PARAMS = [
    *RANGE_PARAMS,
    OpenApiParameter("kind", OpenApiTypes.STR, enum=[k.value for k in EventKind]),
]


def in_range(qs: QuerySet, field: str, query: dict[str, Any]) -> QuerySet:
    if query.get("since"):
        qs = qs.filter(**{f"{field}__gte": query["since"]})
    if query.get("until"):
        qs = qs.filter(**{f"{field}__lt": query["until"]})
    return qs


class CsvRenderer(BaseRenderer):
    """Lets `Accept: text/csv` through content negotiation; the export streams its own body."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context=None):
        return orjson.dumps(data)  # only error bodies get here


# --- views ------------------------------------------------------------------------------------


@extend_schema(tags=["devices"])
class DeviceViewSet(ApiViewMixin, viewsets.ModelViewSet):
    lookup_field = "device_id"
    lookup_value_regex = DEVICE_LOOKUP
    pagination_class = cursor_by("device_id")
    serializer_class = DeviceSerializer
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]
    scopes = {
        "list": Scope.DEVICES_READ,
        "retrieve": Scope.DEVICES_READ,
        "state": Scope.DEVICES_READ,
        "transitions": Scope.DEVICES_READ,
        "create": Scope.DEVICES_WRITE,
        "update": Scope.DEVICES_WRITE,
        "partial_update": Scope.DEVICES_WRITE,
        "destroy": Scope.DEVICES_WRITE,
        "telemetry": Scope.TELEMETRY_READ,
        "telemetry_export": Scope.TELEMETRY_READ,
    }

    def get_queryset(self) -> QuerySet[Device]:
        return self.scoped(Device).order_by("device_id")

    def get_serializer_class(self) -> type[serializers.Serializer]:
        if self.action in ("update", "partial_update"):
            return DeviceUpdateSerializer
        return DeviceSerializer

    def perform_create(self, serializer: DeviceSerializer) -> None:
        self._save(Device(owner_id=self.client.owner_id, **serializer.validated_data), serializer)

    def perform_update(self, serializer: DeviceSerializer) -> None:
        device = serializer.instance
        for name, value in serializer.validated_data.items():
            setattr(device, name, value)
        self._save(device, serializer)

    def _save(self, device: Device, serializer: DeviceSerializer) -> None:
        if not device.topic:
            device.topic = device.device_id  # as Device.save() would, before validation
        device.full_clean()
        try:
            with transaction.atomic():
                device.save()
        except IntegrityError:
            # Another request created the same id or topic between validation and insert.
            raise Conflict("A device with this id or topic exists already.") from None
        serializer.instance = device

    @extend_schema(responses=DeviceStateSerializer)
    @action(detail=True, methods=["get"])
    def state(self, request: Request, device_id: str) -> Response:
        return Response(live.device_state(self.get_object()))

    @extend_schema(parameters=RANGE_PARAMS, responses=TransitionSerializer(many=True))
    @action(
        detail=True,
        methods=["get"],
        serializer_class=TransitionSerializer,
        pagination_class=cursor_by("-at", "-id"),
    )
    def transitions(self, request: Request, device_id: str) -> Response:
        device = self.get_object()
        query = _query(RangeQuery, request)
        qs = in_range(
            Transition.objects.filter(owner_id=device.owner_id, device=device), "at", query
        )
        return self._page(qs, TransitionSerializer)

    @extend_schema(parameters=TELEMETRY_PARAMS, responses=TelemetrySerializer(many=True))
    @action(
        detail=True,
        methods=["get"],
        serializer_class=TelemetrySerializer,
        pagination_class=cursor_by("-ts", "-id"),
    )
    def telemetry(self, request: Request, device_id: str) -> Response:
        qs = self._telemetry(request)
        return self._page(qs, TelemetrySerializer)

    @extend_schema(
        parameters=TELEMETRY_PARAMS,
        responses={(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="CSV")},
    )
    @action(
        detail=True,
        methods=["get"],
        url_path="telemetry/export",
        renderer_classes=[*ApiViewMixin.renderer_classes, CsvRenderer],
    )
    def telemetry_export(self, request: Request, device_id: str) -> StreamingHttpResponse:
        qs = self._telemetry(request).order_by("ts", "id")
        rows = qs.values_list("id", "ts", "received_at", "kind", "seq", "topic", "data")
        asynchronous = isinstance(request._request, ASGIRequest)
        body = _csv_async(rows) if asynchronous else _csv_sync(rows)
        response = StreamingHttpResponse(body, content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{device_id}-telemetry.csv"'
        return response

    def _telemetry(self, request: Request) -> QuerySet[Telemetry]:
        device = self.get_object()
        query = _query(TelemetryQuery, request)
        qs = Telemetry.objects.filter(owner_id=device.owner_id, device=device)
        if query.get("kind"):
            qs = qs.filter(kind=query["kind"])
        return in_range(qs, "ts", query)

    def _page(self, qs: QuerySet, serializer_class: type) -> Response:
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(serializer_class(page, many=True).data)


def _query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    query = serializer_class(data=request.query_params)
    query.is_valid(raise_exception=True)
    return dict(query.validated_data)


# --- CSV export, streamed in keyset pages ------------------------------------------------------

CSV_HEADER = ("id", "ts", "received_at", "kind", "seq", "topic", "data")


def _csv_lines(rows: list[tuple], header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(CSV_HEADER)
    for pk, ts, received, kind, seq, topic, data in rows:
        writer.writerow(
            (
                pk,
                _iso(ts),
                _iso(received),
                kind,
                "" if seq is None else seq,
                topic,
                orjson.dumps(data).decode(),
            )
        )
    return out.getvalue()


def _iso(value: datetime) -> str:
    return value.isoformat()


def _chunk(rows: QuerySet, after: tuple | None) -> list[tuple]:
    # Keyset pagination on (ts, id): constant cost per chunk however far the export has got,
    # and no server-side cursor held open across the whole (slow) download.
    if after is not None:
        ts, pk = after
        rows = rows.filter(ts__gte=ts).exclude(ts=ts, id__lte=pk)
    return list(rows[:EXPORT_CHUNK])


def _csv_sync(rows: QuerySet) -> Iterator[str]:
    after, first = None, True
    while True:
        chunk = _chunk(rows, after)
        if not chunk and not first:
            return
        yield _csv_lines(chunk, header=first)
        first = False
        if len(chunk) < EXPORT_CHUNK:
            return
        after = (chunk[-1][1], chunk[-1][0])


async def _csv_async(rows: QuerySet) -> AsyncIterator[str]:
    # Under daphne a sync iterator would be read whole into memory before the first byte goes
    # out (Django's ASGI handler consumes it in a thread); an async one streams chunk by chunk.
    after, first = None, True
    while True:
        chunk = await sync_to_async(_chunk)(rows, after)
        if not chunk and not first:
            return
        yield _csv_lines(chunk, header=first)
        first = False
        if len(chunk) < EXPORT_CHUNK:
            return
        after = (chunk[-1][1], chunk[-1][0])
