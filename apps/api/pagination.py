"""Cursor pagination everywhere: stable under inserts (telemetry arrives all the time) and
cheap at any depth, unlike page numbers and offsets."""

from __future__ import annotations

from rest_framework.pagination import CursorPagination


class Cursor(CursorPagination):
    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000
    ordering = "-id"


def cursor_by(*fields: str, size: int = 100) -> type[Cursor]:
    """A paginator ordered by `fields` (the first decides the cursor; the rest break ties)."""
    return type(
        "CursorBy_" + "_".join(f.lstrip("-") for f in fields),
        (Cursor,),
        {"ordering": fields, "page_size": size},
    )
