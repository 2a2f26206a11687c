"""`{% device_schedules device %}`: the schedules card of a device page.

The device page (apps.devices.views) includes `schedules/_device_schedules.html`, which calls
this tag; the device there is already scoped to the user.
"""

from __future__ import annotations

from typing import Any

from django import template

from ..views import device_schedules_context

register = template.Library()


@register.inclusion_tag("schedules/_device_schedules_card.html", takes_context=True)
def device_schedules(context: template.Context, device: Any) -> dict[str, Any]:
    request = context.get("request")
    user = getattr(request, "user", None)
    next_url = request.get_full_path() if request is not None else ""
    return {
        **device_schedules_context(user, device, next_url),
        "request": request,
        "csrf_token": context.get("csrf_token"),
    }
