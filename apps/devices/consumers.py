"""The live-status WebSocket (`/ws/live/`): a snapshot on connect, then deltas.

A socket joins the group of every owner its user may see, and a device group only when the
page asks for it (`subscribe`) and the device passes the same scoping rule as the pages.
Anything a browser receives is built in `apps.devices.live`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from apps.owners.scoping import owner_ids_for, scope

from . import live
from .models import Device

logger = logging.getLogger(__name__)

# Close codes (4000-4999 are the application's): the page reconnects on both.
CLOSE_SCOPE_CHANGED = 4001
MAX_DEVICE_SUBSCRIPTIONS = 20
# Client messages cost queries (snapshot, subscribe): a burst of 20, then one every 0.5 s.
CLIENT_BURST = 20
CLIENT_REFILL_PER_S = 2.0

# Sockets accepted by this process and not yet gone (`/metrics`: iot_websocket_clients). Only
# the event loop's thread changes it.
_connected = 0


def connected() -> int:
    return _connected


class LiveConsumer(AsyncJsonWebsocketConsumer):
    owner_ids: set[int]
    all_owners: bool
    device_groups: dict[str, str]  # device_id -> group

    async def connect(self) -> None:
        user = self.scope.get("user")
        # Refused before accept(): the handshake fails with 403 and nothing is ever sent.
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close()
            return
        self.device_groups = {}
        self.owner_ids, self.all_owners = set(), False
        self._tokens, self._tokens_at = float(CLIENT_BURST), time.monotonic()
        ids = await self._allowed_owner_ids()
        if ids is None:
            # A superuser: every owner's group (they see every owner's devices anyway).
            self.all_owners = True
            ids = await database_sync_to_async(_all_owner_ids)()
        self.owner_ids = set(ids)
        groups = [live.owner_group(owner_id) for owner_id in self.owner_ids]
        # Marked watched before joining, and joined before the snapshot: whatever the snapshot
        # misses was committed later, and its message is sent to a group we are in.
        await self._mark_watched(groups)
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self._renewing = asyncio.create_task(self._renew_watch())
        await self.accept()
        global _connected
        _connected += 1
        self._counted = True
        await self.send_json(await self._snapshot())

    async def disconnect(self, code: int) -> None:
        if getattr(self, "_counted", False):
            global _connected
            _connected -= 1
            self._counted = False
        renewing = getattr(self, "_renewing", None)
        if renewing is not None:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        # `connect` may have refused before setting anything up.
        for owner_id in getattr(self, "owner_ids", ()):
            await self.channel_layer.group_discard(live.owner_group(owner_id), self.channel_name)
        for group in getattr(self, "device_groups", {}).values():
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if not self._take_token():
            await self.send_json(live.error_message("rate_limited", "too many messages"))
            return
        if kind == "ping":
            await self._recheck_scope()
            await self.send_json({"type": "pong"})
        elif kind == "snapshot":
            await self.send_json(await self._snapshot())
        elif kind == "subscribe":
            await self._subscribe(content.get("device"))
        elif kind == "unsubscribe":
            group = self.device_groups.pop(str(content.get("device")), None)
            if group:
                await self.channel_layer.group_discard(group, self.channel_name)
        else:
            await self.send_json(live.error_message("bad_request", f"unknown type {kind!r}"))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kw):
        try:
            await super().receive(text_data=text_data, bytes_data=bytes_data, **kw)
        except ValueError:  # malformed JSON from the page: answer, do not drop the socket
            await self.send_json(live.error_message("bad_request", "messages must be JSON"))

    async def live_push(self, event: dict[str, Any]) -> None:
        """A layer envelope from `live`: forward its messages if they are for our owners."""
        if event.get("owner_id") not in self.owner_ids and not self.all_owners:
            logger.error(
                "dropped a live message of owner %s on a foreign socket", event.get("owner_id")
            )
            return
        for payload in event.get("payloads", ()):
            await self.send_json(payload)

    # -- helpers --

    async def _renew_watch(self) -> None:
        """Keep this socket's groups marked watched while it is connected (live.watch)."""
        while True:
            await asyncio.sleep(live.WATCH_RENEW)
            groups = [live.owner_group(o) for o in self.owner_ids]
            await self._mark_watched([*groups, *self.device_groups.values()])

    async def _mark_watched(self, groups: list[str]) -> None:
        try:
            await live.awatch(groups)
        except Exception:  # a cache hiccup must not cost the socket; the next renewal heals
            logger.warning("live: could not mark groups watched", exc_info=True)

    def _take_token(self) -> bool:
        now = time.monotonic()
        elapsed, self._tokens_at = now - self._tokens_at, now
        self._tokens = min(CLIENT_BURST, self._tokens + elapsed * CLIENT_REFILL_PER_S)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _subscribe(self, device_id: Any) -> None:
        if not isinstance(device_id, str) or not device_id:
            await self.send_json(live.error_message("bad_request", "subscribe needs a device id"))
            return
        if device_id in self.device_groups:
            await self.send_json({"type": "subscribed", "device": device_id})
            return
        if len(self.device_groups) >= MAX_DEVICE_SUBSCRIPTIONS:
            await self.send_json(live.error_message("too_many", "too many device subscriptions"))
            return
        pk = await self._visible_device_pk(device_id)
        if pk is None:
            # Same answer for "does not exist" and "not yours", as the pages' 404.
            await self.send_json(
                live.error_message("not_found", "no such device", device=device_id)
            )
            return
        group = live.device_group(pk)
        await self._mark_watched([group])
        await self.channel_layer.group_add(group, self.channel_name)
        self.device_groups[device_id] = group
        await self.send_json({"type": "subscribed", "device": device_id})

    async def _recheck_scope(self) -> None:
        """Close the socket when the user's owners changed (e.g. removed from a team).

        Checked on each keepalive, so a revoked membership stops the stream within a ping
        interval; the page reconnects and gets a snapshot of what it may see now.
        """
        ids = await self._allowed_owner_ids()
        now = None if ids is None else set(ids)
        if (now is None) != self.all_owners or (now is not None and now != self.owner_ids):
            await self.close(code=CLOSE_SCOPE_CHANGED)

    @database_sync_to_async
    def _allowed_owner_ids(self) -> list[int] | None:
        user = self.scope["user"]
        user.refresh_from_db(fields=["is_active", "is_superuser"])
        return owner_ids_for(user)

    @database_sync_to_async
    def _visible_device_pk(self, device_id: str) -> int | None:
        qs = scope(Device.objects.filter(device_id=device_id), self.scope["user"])
        return qs.values_list("pk", flat=True).first()

    @database_sync_to_async
    def _snapshot(self) -> dict[str, Any]:
        qs = scope(Device.objects.all(), self.scope["user"]).order_by("owner_id", "device_id")
        devices = list(qs[: live.SNAPSHOT_LIMIT + 1])
        truncated = len(devices) > live.SNAPSHOT_LIMIT
        return live.snapshot_message(devices[: live.SNAPSHOT_LIMIT], truncated=truncated)


def _all_owner_ids() -> list[int]:
    from apps.owners.models import Owner

    return list(Owner.objects.values_list("pk", flat=True))
