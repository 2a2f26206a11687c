"""Commands: switch a device (through `execute_command`), list them, read one with its result."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.generics import get_object_or_404
from rest_framework.request import Request
from rest_framework.response import Response

from apps.devices.commands import CommandRefused, Issuer, execute_command
from apps.devices.models import Command, CommandStatus, Device

from ..base import ApiViewMixin
from ..errors import Conflict
from ..models import Scope
from ..pagination import cursor_by
from .devices import DEVICE_LOOKUP

# Reading command results: whoever may switch devices may see what became of it.
READ_COMMANDS = (Scope.DEVICES_READ, Scope.COMMANDS_WRITE)


class CommandIssuerSerializer(serializers.Serializer):
    type = serializers.CharField()
    id = serializers.CharField(allow_blank=True)
    label = serializers.CharField(allow_blank=True)


class CommandSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="request_id", read_only=True)
    device = serializers.CharField(source="device.device_id", read_only=True)
    issuer = serializers.SerializerMethodField()

    class Meta:
        model = Command
        fields = (
            "id",
            "device",
            "action",
            "relay",
            "params",
            "status",
            "detail",
            "issuer",
            "issued_at",
            "published_at",
            "resolved_at",
            "expires_at",
            "confirm_by",
        )
        read_only_fields = fields

    @extend_schema_field(CommandIssuerSerializer)
    def get_issuer(self, obj: Command) -> dict[str, str]:
        return {"type": obj.issuer_type, "id": obj.issuer_id, "label": obj.issuer_label}


class CommandRequestSerializer(serializers.Serializer):
    action = serializers.CharField(
        max_length=64,
        help_text="ON, OFF or TOGGLE for lamps and relays; a command name for meter-v2.",
    )
    relay = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=8, help_text="Tasmota relay (1–8)."
    )
    params = serializers.DictField(
        required=False, child=serializers.JSONField(), help_text="meter-v2 command parameters."
    )
    ttl = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=86400,
        help_text="Seconds a command for an offline device (policy 'queue') is held.",
    )


@extend_schema(tags=["commands"])
class DeviceCommandView(ApiViewMixin, viewsets.GenericViewSet):
    """POST /devices/{device_id}/commands/: send one command."""

    lookup_field = "device_id"
    lookup_value_regex = DEVICE_LOOKUP
    serializer_class = CommandRequestSerializer
    scopes = {"create": Scope.COMMANDS_WRITE}

    def get_queryset(self) -> QuerySet[Device]:
        return self.scoped(Device)

    @extend_schema(
        request=CommandRequestSerializer,
        responses={202: CommandSerializer},
        description=(
            "Publishes the command (QoS 1) and answers 202 with its status at that moment: "
            "`published`, `queued` (offline device, policy 'queue'), `failed` — or `pending` "
            "when sent with an Idempotency-Key (it is published once the key's record is "
            "stored). Poll `GET /commands/{id}/` for `confirmed`, `unconfirmed` or `expired`."
        ),
    )
    def create(self, request: Request, device_id: str) -> Response:
        device = get_object_or_404(self.get_queryset(), device_id=device_id)
        body = CommandRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data: dict[str, Any] = body.validated_data
        key = self.client.key
        issuer = Issuer.for_api_key(key_id=key.pk, label=key.name, owner_id=key.owner_id)
        try:
            command = execute_command(
                device=device,
                action=data["action"],
                issuer=issuer,
                relay=data.get("relay"),
                params=data.get("params") or None,
                ttl=data.get("ttl"),
            )
        except CommandRefused as refused:
            if refused.code == CommandRefused.OFFLINE:
                raise Conflict(refused.message, code="device_offline") from None
            if refused.code == CommandRefused.INVALID:
                raise serializers.ValidationError({"action": [refused.message]}) from None
            raise  # FORBIDDEN cannot happen for a scoped device; a 500 would say we were wrong
        url = reverse("api:command-detail", args=[command.request_id])
        return Response(
            CommandSerializer(command).data,
            status=status.HTTP_202_ACCEPTED,
            headers={"Location": url},
        )


@extend_schema(tags=["commands"])
class CommandViewSet(
    ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    serializer_class = CommandSerializer
    lookup_field = "request_id"
    lookup_url_kwarg = "id"
    lookup_value_regex = "[0-9a-fA-F-]{36}"
    pagination_class = cursor_by("-issued_at", "-id")
    scopes = {"list": READ_COMMANDS, "retrieve": READ_COMMANDS}

    def get_queryset(self) -> QuerySet[Command]:
        qs = self.scoped(Command).select_related("device")
        if self.action == "list":
            device = self.request.query_params.get("device")
            if device:
                qs = qs.filter(device__device_id=device)
            wanted = self.request.query_params.get("status")
            if wanted:
                if wanted not in CommandStatus.values:
                    raise serializers.ValidationError({"status": ["Not a command status."]})
                qs = qs.filter(status=wanted)
        return qs

    @extend_schema(
        parameters=[
            OpenApiParameter("device", OpenApiTypes.STR, description="Only this device's."),
            OpenApiParameter("status", OpenApiTypes.STR, enum=list(CommandStatus.values)),
        ]
    )
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().retrieve(request, *args, **kwargs)
