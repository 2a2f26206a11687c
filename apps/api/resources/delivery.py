"""Data Delivery: destinations of every kind, Test Connection, stats, deliveries, attempts, replay.

Each kind has its own CRUD resource with its own concrete schema (`/destinations/webhook/`,
and one per further kind registered in `apps.forwarding.kinds.KINDS`); what every kind shares —
listing, test, stats, deliveries, attempts, replay — lives under `/destinations/{id}/`.
Secrets (signing secrets, secret header values, database passwords) are write-only: they are
accepted on create and update and never appear in a response.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.fields import EncryptedTextField
from apps.devices.events import EVENT_TYPES
from apps.forwarding import actions, kinds
from apps.forwarding.models import Attempt, Delivery, Destination, Outcome, Status
from apps.forwarding.webhook.models import WebhookDestination, WebhookHeader

from ..base import ApiViewMixin
from ..errors import Conflict
from ..fields import device_ref
from ..models import Scope
from ..pagination import cursor_by

UUID_LOOKUP = "[0-9a-fA-F-]{36}"
MAX_REPLAY_IDS = 1000
LATENCY_SAMPLE = 1000

COMMON_FIELDS = (
    "id",
    "kind",
    "name",
    "enabled",
    "event_types",
    "devices",
    "max_attempts",
    "initial_delay",
    "backoff_factor",
    "max_delay",
    "rate_limit",
)
HEALTH_FIELDS = (
    "disabled_reason",
    "disabled_at",
    "failing_since",
    "last_success_at",
    "last_error",
    "last_error_at",
    "last_test_at",
    "last_test_ok",
    "last_test_status",
    "last_test_ms",
    "last_test_message",
    "created_at",
    "updated_at",
)


class DestinationSerializer(serializers.ModelSerializer):
    """What every kind shares; also the generic read-only view of any destination."""

    id = serializers.UUIDField(source="uuid", read_only=True)
    kind = serializers.CharField(read_only=True)
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EVENT_TYPES),
        required=False,
        help_text="Empty: every event type.",
    )
    devices = device_ref(many=True, required=False, help_text="Device ids; empty: every device.")

    class Meta:
        model = Destination
        fields = (*COMMON_FIELDS, *HEALTH_FIELDS)
        read_only_fields = HEALTH_FIELDS


# --- webhook ---------------------------------------------------------------------------------


class HeaderSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    value = serializers.CharField(
        max_length=1000, required=False, allow_null=True, help_text="A plain value."
    )
    secret_value = serializers.CharField(
        max_length=1000,
        required=False,
        write_only=True,
        help_text="A secret value (tokens): stored encrypted, never returned. On update, omit "
        "both value and secret_value to keep a header's stored secret.",
    )
    secret = serializers.BooleanField(read_only=True, help_text="Whether the value is secret.")

    def to_representation(self, header: WebhookHeader) -> dict[str, Any]:
        secret = bool(header.secret_value)
        return {"name": header.name, "value": None if secret else header.value, "secret": secret}


class WebhookSerializer(DestinationSerializer):
    secret = serializers.CharField(
        write_only=True,
        required=False,
        max_length=200,
        help_text="Signing secret, whsec_… (Standard Webhooks). Generated when omitted on create; "
        "set your own to verify signatures. Never returned.",
    )
    payload_template = serializers.JSONField(required=False, allow_null=True)
    headers = HeaderSerializer(many=True, required=False)

    class Meta:
        model = WebhookDestination
        fields = (
            *COMMON_FIELDS,
            "url",
            "method",
            "timeout",
            "max_in_flight",
            "secret",
            "payload_template",
            "headers",
            *HEALTH_FIELDS,
        )
        read_only_fields = HEALTH_FIELDS

    def to_representation(self, instance: WebhookDestination) -> dict[str, Any]:
        data = super().to_representation(instance)
        data["headers"] = [HeaderSerializer().to_representation(h) for h in instance.headers.all()]
        return data


def _secret_fields(model: type) -> list[str]:
    return [f.name for f in model._meta.concrete_fields if isinstance(f, EncryptedTextField)]


def serializer_for_kind(key: str) -> type[DestinationSerializer]:
    """The webhook serializer, or one built from another kind's model (secrets write-only)."""
    if key == "webhook":
        return WebhookSerializer
    model = kinds.KINDS[key].model
    own = [
        f.name
        for f in model._meta.concrete_fields
        if f.model is model and f.editable and not f.primary_key and not f.one_to_one
    ]
    secrets = set(_secret_fields(model))
    meta = type(
        "Meta",
        (),
        {
            "model": model,
            "fields": (*COMMON_FIELDS, *own, *HEALTH_FIELDS),
            "read_only_fields": HEALTH_FIELDS,
            "extra_kwargs": {name: {"write_only": True, "required": False} for name in secrets},
        },
    )
    name = "".join(part.title() for part in key.split("_")) + "DestinationSerializer"
    return type(name, (DestinationSerializer,), {"Meta": meta})


# --- saving (the kinds' models validate; apps.forwarding.actions reacts) ------------------------


def save_destination(
    destination: Destination, data: dict[str, Any], *, creating: bool
) -> Destination:
    data = dict(data)
    devices = data.pop("devices", None)
    headers = data.pop("headers", None)
    enabled = data.pop("enabled", None)
    for secret in _secret_fields(type(destination)):
        if secret in data and not data[secret]:
            data.pop(secret)  # empty means "keep" (on create: generate, for webhooks)
    for name, value in data.items():
        setattr(destination, name, value)
    if creating and enabled is not None:
        destination.enabled = enabled
    destination.full_clean(exclude=["devices"])
    try:
        with transaction.atomic():
            destination.save()
            if devices is not None:
                destination.devices.set(devices)
            if headers is not None:
                _save_headers(destination, headers)
    except IntegrityError:
        raise Conflict("A destination with this name exists already.") from None
    if not creating and enabled is not None and enabled != destination.enabled:
        if enabled:
            actions.enable_destination(destination)
        else:
            actions.disable_destination(destination, "Disabled through the API.")
    actions.destination_saved(destination, test=True)
    return destination


def _save_headers(destination: Destination, headers: list[dict[str, Any]]) -> None:
    """Replace the header set; an entry without value or secret keeps its stored secret."""
    existing = {h.name.lower(): h for h in destination.headers.all()}
    seen: set[str] = set()
    errors = []
    for item in headers:
        name = item["name"]
        if name.lower() in seen:
            errors.append(f"{name}: given twice.")
            continue
        seen.add(name.lower())
        header = existing.get(name.lower()) or WebhookHeader(destination=destination, name=name)
        header.owner_id = destination.owner_id
        value, secret = item.get("value"), item.get("secret_value")
        if value:
            header.value, header.secret_value = value, ""
        elif secret:
            header.value, header.secret_value = "", secret
        elif not header.pk or not header.secret_value:
            errors.append(f"{name}: give a value or a secret_value.")
            continue
        try:
            header.full_clean(exclude=["destination", "owner"])
        except Exception as exc:  # a Django ValidationError: one message per header
            errors.append(f"{name}: {'; '.join(getattr(exc, 'messages', [str(exc)]))}")
            continue
        header.save()
    if errors:
        raise serializers.ValidationError({"headers": errors})
    gone = [h.pk for key, h in existing.items() if key not in seen]
    WebhookHeader.objects.filter(pk__in=gone, destination=destination).delete()


# --- per-kind CRUD ---------------------------------------------------------------------------

WRITE = Scope.DELIVERY_WRITE
READ = Scope.DELIVERY_READ


class KindDestinationViewSet(ApiViewMixin, viewsets.ModelViewSet):
    kind_key = ""
    lookup_field = "uuid"
    lookup_url_kwarg = "id"
    lookup_value_regex = UUID_LOOKUP
    pagination_class = cursor_by("id")
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]
    scopes = {
        "list": READ,
        "retrieve": READ,
        "create": WRITE,
        "update": WRITE,
        "partial_update": WRITE,
        "destroy": WRITE,
    }

    def get_queryset(self) -> QuerySet:
        qs = self.scoped(kinds.KINDS[self.kind_key].model).prefetch_related("devices")
        return qs.prefetch_related("headers") if self.kind_key == "webhook" else qs

    def perform_create(self, serializer: DestinationSerializer) -> None:
        model = kinds.KINDS[self.kind_key].model
        destination = model(owner_id=self.client.owner_id)
        serializer.instance = save_destination(
            destination, serializer.validated_data, creating=True
        )

    def perform_update(self, serializer: DestinationSerializer) -> None:
        serializer.instance = save_destination(
            serializer.instance, serializer.validated_data, creating=False
        )


def kind_viewset(key: str) -> type[KindDestinationViewSet]:
    serializer = serializer_for_kind(key)
    name = "".join(part.title() for part in key.split("_")) + "DestinationViewSet"
    viewset = type(
        name, (KindDestinationViewSet,), {"kind_key": key, "serializer_class": serializer}
    )
    return extend_schema(tags=["delivery"])(viewset)


# --- what every kind shares ------------------------------------------------------------------


class TestResultSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    message = serializers.CharField(allow_blank=True)
    status_code = serializers.IntegerField(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)


class LatencySerializer(serializers.Serializer):
    p50 = serializers.IntegerField(allow_null=True)
    p95 = serializers.IntegerField(allow_null=True)
    sample = serializers.IntegerField(help_text="Successful attempts measured (newest first).")


class StatsSerializer(serializers.Serializer):
    delivered = serializers.IntegerField()
    failed = serializers.IntegerField()
    retried = serializers.IntegerField()
    attempts = serializers.IntegerField()
    success_rate = serializers.FloatField(allow_null=True)
    backlog = serializers.IntegerField(help_text="Deliveries waiting or being sent.")
    dead_letters = serializers.IntegerField(help_text="Failed for good; replayable.")
    last_success_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField(allow_blank=True)
    last_error_at = serializers.DateTimeField(allow_null=True)
    latency_ms = LatencySerializer()


class AttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = Attempt
        fields = (
            "id",
            "delivery",
            "number",
            "started_at",
            "duration_ms",
            "outcome",
            "status_code",
            "error",
            "response",
        )


class DeliverySerializer(serializers.ModelSerializer):
    destination = serializers.UUIDField(source="destination.uuid", read_only=True)
    payload = serializers.JSONField(
        help_text="The event; for a row carrying several (`events` > 1), the list of them."
    )
    events = serializers.IntegerField(
        read_only=True,
        help_text="Events the row carries: a database destination's row carries a batch.",
    )

    class Meta:
        model = Delivery
        fields = (
            "id",
            "destination",
            "event_id",
            "event_type",
            "device",
            "message_id",
            "status",
            "attempts",
            "next_attempt_at",
            "last_attempt_at",
            "last_status_code",
            "last_error",
            "delivered_at",
            "replays",
            "created_at",
            "events",
            "payload",
        )


class DeliveryDetailSerializer(DeliverySerializer):
    attempt_log = serializers.SerializerMethodField()

    class Meta(DeliverySerializer.Meta):
        fields = (*DeliverySerializer.Meta.fields, "attempt_log")

    @extend_schema_field(AttemptSerializer(many=True))
    def get_attempt_log(self, delivery: Delivery) -> list[dict[str, Any]]:
        rows = delivery.attempt_log.filter(owner_id=delivery.owner_id).order_by("number")[:100]
        return AttemptSerializer(rows, many=True).data


class ReplaySerializer(serializers.Serializer):
    deliveries = serializers.ListField(
        child=serializers.IntegerField(min_value=1),
        required=False,
        max_length=MAX_REPLAY_IDS,
        help_text="Replay these deliveries (of this destination).",
    )
    since = serializers.DateTimeField(required=False, help_text="Created at or after.")
    until = serializers.DateTimeField(required=False, help_text="Created before.")
    include_delivered = serializers.BooleanField(
        required=False, default=False, help_text="With a range: delivered ones too."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("deliveries") and (attrs.get("since") or attrs.get("until")):
            raise serializers.ValidationError("Give deliveries or a time range, not both.")
        return attrs


class ReplayResultSerializer(serializers.Serializer):
    replayed = serializers.IntegerField(help_text="Events queued again.")


DELIVERY_PARAMS = [
    OpenApiParameter("status", OpenApiTypes.STR, enum=list(Status.values)),
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="Created at or after."),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="Created before."),
]


class DeliveryQuery(serializers.Serializer):
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)


@extend_schema(tags=["delivery"])
class DestinationViewSet(
    ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Every destination, whatever its kind (change them through their kind's resource)."""

    serializer_class = DestinationSerializer
    lookup_field = "uuid"
    lookup_url_kwarg = "id"
    lookup_value_regex = UUID_LOOKUP
    pagination_class = cursor_by("id")
    scopes = {
        "list": READ,
        "retrieve": READ,
        "stats": READ,
        "deliveries": READ,
        "attempts": READ,
        "test": WRITE,
        "replay": WRITE,
    }

    @property
    def idempotent_atomic(self) -> bool:  # type: ignore[override]
        # Test Connection waits on the network: no transaction (and SQLite lock) held meanwhile.
        return self.action != "test"

    def get_queryset(self) -> QuerySet[Destination]:
        return self.scoped(Destination).prefetch_related("devices")

    @extend_schema(request=None, responses=TestResultSerializer)
    @action(detail=True, methods=["post"])
    def test(self, request: Request, id: str) -> Response:
        result = actions.test_destination(self.get_object())
        return Response(
            TestResultSerializer(
                {
                    "ok": result.ok,
                    "message": result.message,
                    "status_code": result.status_code,
                    "duration_ms": result.duration_ms,
                }
            ).data
        )

    @extend_schema(responses=StatsSerializer)
    @action(detail=True, methods=["get"])
    def stats(self, request: Request, id: str) -> Response:
        return Response(StatsSerializer(destination_stats(self.get_object())).data)

    @extend_schema(parameters=DELIVERY_PARAMS, responses=DeliverySerializer(many=True))
    @action(
        detail=True,
        methods=["get"],
        serializer_class=DeliverySerializer,
        pagination_class=cursor_by("-id"),
    )
    def deliveries(self, request: Request, id: str) -> Response:
        destination = self.get_object()
        query = DeliveryQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        qs = Delivery.objects.filter(owner_id=destination.owner_id, destination=destination)
        q = query.validated_data
        if q.get("status"):
            qs = qs.filter(status=q["status"])
        if q.get("since"):
            qs = qs.filter(created_at__gte=q["since"])
        if q.get("until"):
            qs = qs.filter(created_at__lt=q["until"])
        page = self.paginate_queryset(qs.select_related("destination"))
        return self.get_paginated_response(DeliverySerializer(page, many=True).data)

    @extend_schema(responses=AttemptSerializer(many=True))
    @action(
        detail=True,
        methods=["get"],
        serializer_class=AttemptSerializer,
        pagination_class=cursor_by("-id"),
    )
    def attempts(self, request: Request, id: str) -> Response:
        destination = self.get_object()
        qs = Attempt.objects.filter(owner_id=destination.owner_id, destination=destination)
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(AttemptSerializer(page, many=True).data)

    @extend_schema(request=ReplaySerializer, responses=ReplayResultSerializer)
    @action(detail=True, methods=["post"], serializer_class=ReplaySerializer)
    def replay(self, request: Request, id: str) -> Response:
        destination = self.get_object()
        body = ReplaySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        mine = Delivery.objects.filter(owner_id=destination.owner_id, destination=destination)
        if data.get("deliveries"):
            count = actions.replay_deliveries(mine.filter(pk__in=data["deliveries"]))
        else:
            count = actions.replay_range(
                mine, data.get("since"), data.get("until"), data["include_delivered"]
            )
        return Response({"replayed": count})


@extend_schema(tags=["delivery"])
class DeliveryViewSet(ApiViewMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """One delivery with its attempt log."""

    serializer_class = DeliveryDetailSerializer
    scopes = {"retrieve": READ}

    def get_queryset(self) -> QuerySet[Delivery]:
        return self.scoped(Delivery).select_related("destination")


def destination_stats(destination: Destination) -> dict[str, Any]:
    deliveries = Delivery.objects.filter(owner_id=destination.owner_id, destination=destination)
    durations = sorted(
        Attempt.objects.filter(
            owner_id=destination.owner_id, destination=destination, outcome=Outcome.DELIVERED
        )
        .order_by("-id")
        .values_list("duration_ms", flat=True)[:LATENCY_SAMPLE]
    )
    return {
        "delivered": destination.delivered_count,
        "failed": destination.failed_count,
        "retried": destination.retried_count,
        "attempts": destination.attempt_count,
        "success_rate": destination.success_rate,
        # Events (a database destination's row carries several).
        "backlog": deliveries.filter(status__in=[Status.PENDING, Status.SENDING]).events(),
        "dead_letters": deliveries.filter(status=Status.FAILED).events(),
        "last_success_at": destination.last_success_at,
        "last_error": destination.last_error,
        "last_error_at": destination.last_error_at,
        "latency_ms": {
            "p50": _percentile(durations, 0.50),
            "p95": _percentile(durations, 0.95),
            "sample": len(durations),
        },
    }


def _percentile(values: list[int], fraction: float) -> int | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(fraction * len(values)))]
