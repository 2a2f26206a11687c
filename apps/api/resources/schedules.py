"""Schedules: CRUD (through `save_schedule`), next-run preview, runs; device groups (read)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.schedules import cron
from apps.schedules.actions import save_schedule
from apps.schedules.models import DeviceGroup, Schedule, ScheduleRun

from ..base import ApiViewMixin
from ..fields import ScopedPrimaryKeyRelatedField, device_ref
from ..models import Scope
from ..pagination import cursor_by

MAX_PREVIEW = 50


class ScheduleSerializer(serializers.ModelSerializer):
    device = device_ref(required=False, allow_null=True, help_text="A device id; or give group.")
    group = ScopedPrimaryKeyRelatedField(
        queryset=DeviceGroup.objects.all(), required=False, allow_null=True
    )

    class Meta:
        model = Schedule
        fields = (
            "id",
            "name",
            "device",
            "group",
            "action",
            "relay",
            "cron",
            "timezone",
            "enabled",
            "starts_on",
            "ends_on",
            "next_run_at",
            "last_run_at",
            "created_at",
            "updated_at",
        )
        read_only_fields = ("id", "next_run_at", "last_run_at", "created_at", "updated_at")


class RunSerializer(serializers.ModelSerializer):
    device = serializers.CharField(source="device.device_id", read_only=True)
    command = serializers.UUIDField(source="command.request_id", read_only=True, allow_null=True)

    class Meta:
        model = ScheduleRun
        fields = ("id", "device", "planned_at", "executed_at", "status", "detail", "command")


class NextRunSerializer(serializers.Serializer):
    at = serializers.DateTimeField(help_text="UTC.")
    # A string: DRF would render a datetime in the server's zone, not the schedule's.
    local = serializers.CharField(help_text="ISO 8601 in the schedule's time zone, with offset.")
    note = serializers.CharField(allow_blank=True, help_text="Set next to a DST change.")


class PreviewQuery(serializers.Serializer):
    cron = serializers.CharField(max_length=100)
    timezone = serializers.CharField(max_length=64)
    starts_on = serializers.DateField(required=False)
    ends_on = serializers.DateField(required=False)
    count = serializers.IntegerField(required=False, min_value=1, max_value=MAX_PREVIEW, default=10)


class CountQuery(serializers.Serializer):
    count = serializers.IntegerField(required=False, min_value=1, max_value=MAX_PREVIEW, default=10)


class GroupSerializer(serializers.ModelSerializer):
    devices = serializers.SlugRelatedField(slug_field="device_id", many=True, read_only=True)

    class Meta:
        model = DeviceGroup
        fields = ("id", "name", "devices", "created_at")


def _rows(rows: list[cron.PreviewRow]) -> list[dict[str, Any]]:
    return [{"at": r.at, "local": r.local.isoformat(), "note": r.note} for r in rows]


COUNT_PARAM = OpenApiParameter("count", OpenApiTypes.INT, description=f"1 to {MAX_PREVIEW}.")


@extend_schema(tags=["schedules"])
class ScheduleViewSet(ApiViewMixin, viewsets.ModelViewSet):
    serializer_class = ScheduleSerializer
    pagination_class = cursor_by("id")
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]
    scopes = {
        "list": Scope.SCHEDULES_READ,
        "retrieve": Scope.SCHEDULES_READ,
        "runs": Scope.SCHEDULES_READ,
        "next_runs": Scope.SCHEDULES_READ,
        "preview": Scope.SCHEDULES_READ,
        "create": Scope.SCHEDULES_WRITE,
        "update": Scope.SCHEDULES_WRITE,
        "partial_update": Scope.SCHEDULES_WRITE,
        "destroy": Scope.SCHEDULES_WRITE,
    }

    def get_queryset(self) -> QuerySet[Schedule]:
        return self.scoped(Schedule).select_related("device", "group")

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        schedule = Schedule(owner_id=self.client.owner_id, **serializer.validated_data)
        serializer.instance = save_schedule(schedule)

    def perform_update(self, serializer: ScheduleSerializer) -> None:
        schedule = serializer.instance
        for name, value in serializer.validated_data.items():
            setattr(schedule, name, value)
        serializer.instance = save_schedule(schedule)

    @extend_schema(parameters=[COUNT_PARAM], responses=NextRunSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="next-runs")
    def next_runs(self, request: Request, pk: str) -> Response:
        schedule = self.get_object()
        count = _query(CountQuery, request)["count"]
        if not schedule.enabled:
            return Response([])
        rows = cron.preview(
            schedule.parsed(),
            schedule.zone(),
            timezone.now(),
            count=count,
            starts_on=schedule.starts_on,
            ends_on=schedule.ends_on,
        )
        return Response(NextRunSerializer(_rows(rows), many=True).data)

    @extend_schema(responses=RunSerializer(many=True))
    @action(
        detail=True,
        methods=["get"],
        serializer_class=RunSerializer,
        pagination_class=cursor_by("-planned_at", "-id"),
    )
    def runs(self, request: Request, pk: str) -> Response:
        schedule = self.get_object()
        qs = ScheduleRun.objects.filter(owner_id=schedule.owner_id, schedule=schedule)
        page = self.paginate_queryset(qs.select_related("device", "command"))
        return self.get_paginated_response(RunSerializer(page, many=True).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("cron", OpenApiTypes.STR, required=True, description="5 fields."),
            OpenApiParameter("timezone", OpenApiTypes.STR, required=True, description="IANA."),
            OpenApiParameter("starts_on", OpenApiTypes.DATE),
            OpenApiParameter("ends_on", OpenApiTypes.DATE),
            COUNT_PARAM,
        ],
        responses=NextRunSerializer(many=True),
        description="The next runs of a schedule that is not saved yet (as the admin shows).",
    )
    @action(detail=False, methods=["get"])
    def preview(self, request: Request) -> Response:
        query = _query(PreviewQuery, request)
        errors: dict[str, list[str]] = {}
        parsed = zone = None
        try:
            parsed = cron.parse(query["cron"])
        except cron.CronError as exc:
            errors["cron"] = [str(exc)]
        try:
            zone = cron.get_zone(query["timezone"])
        except cron.CronError as exc:
            errors["timezone"] = [str(exc)]
        starts_on, ends_on = query.get("starts_on"), query.get("ends_on")
        if starts_on and ends_on and ends_on < starts_on:
            errors["ends_on"] = ["The end date is before the start date."]
        if errors or parsed is None or zone is None:
            raise serializers.ValidationError(errors)
        rows = cron.preview(
            parsed, zone, timezone.now(), count=query["count"], starts_on=starts_on, ends_on=ends_on
        )
        return Response(NextRunSerializer(_rows(rows), many=True).data)


@extend_schema(tags=["schedules"])
class GroupViewSet(
    ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Device groups that schedules can target (managed in the admin)."""

    serializer_class = GroupSerializer
    pagination_class = cursor_by("id")
    scopes = {"list": Scope.DEVICES_READ, "retrieve": Scope.DEVICES_READ}

    def get_queryset(self) -> QuerySet[DeviceGroup]:
        return self.scoped(DeviceGroup).prefetch_related("devices")


def _query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    query = serializer_class(data=request.query_params)
    query.is_valid(raise_exception=True)
    return dict(query.validated_data)
