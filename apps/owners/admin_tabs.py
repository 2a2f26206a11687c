"""The tabs of the "IoT Owners" page (the Owner change view).

Each app contributes its tab from its own `admin.py`; adding a tab is one call:

    from apps.owners.admin_tabs import OwnerTab, register_owner_tab

    # A read-only panel: a template rendered with {"owner", "request", **context(request, owner)}.
    register_owner_tab(OwnerTab(
        key="schedules", title="Schedules", order=40,
        template="admin/schedules/owner_tab.html", context=schedules_tab_context,
    ))

    # Or an editable inline of the owner (it must use OwnerScopedAdminMixin):
    register_owner_tab(OwnerTab(key="api-keys", title="API keys", order=50, inline=ApiKeyInline))

Panels render outside the owner form, so they may hold their own links and buttons but no form
fields; inlines render inside it and are saved with the owner's Save button. `min_role` hides a
tab from members below that role. Orders in use: 0 Overview, 20 Devices, 30 Data Delivery,
40 Schedules, 50 API keys, 90 Members.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest

from .models import Owner, Role

# The tab that also shows the owner's own fields: unfold shows fieldsets when its Alpine
# `activeTab` is "general", so the Overview tab must carry that key.
GENERAL = "general"


@dataclass(frozen=True)
class OwnerTab:
    key: str
    title: str
    order: int = 100
    template: str | None = None
    context: Callable[[HttpRequest, Owner], dict[str, Any]] | None = None
    inline: type | None = None
    min_role: str = Role.VIEWER

    def __post_init__(self) -> None:
        if (self.template is None) == (self.inline is None):
            raise ValueError(f"owner tab {self.key!r}: give exactly one of template or inline")


_tabs: dict[str, OwnerTab] = {}


def register_owner_tab(tab: OwnerTab) -> OwnerTab:
    """Add (or, with the same key, replace — admin modules may be imported twice) a tab."""
    _tabs[tab.key] = tab
    return tab


def owner_tabs() -> list[OwnerTab]:
    return sorted(_tabs.values(), key=lambda tab: (tab.order, tab.key))
