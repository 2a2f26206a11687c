"""Index types the models share."""

from __future__ import annotations

from typing import Any

from django.db import models


class TimeOrderIndex(models.Index):
    """A BRIN index on PostgreSQL, a B-tree elsewhere: for a timestamp that grows with the table.

    Rows written in time order (`created_at` of the outbox, `started_at` of the attempt log)
    sit in the heap in that order, so a block-range summary answers the range queries on them
    (retention, replay by time range, the admin's date filters) for a few pages of index,
    without a B-tree entry per inserted and per updated row on the tables the pipeline writes
    thousands of rows a second into. SQLite has only B-trees.
    """

    def create_sql(self, model: Any, schema_editor: Any, using: str = "", **kwargs: Any) -> Any:
        if schema_editor.connection.vendor == "postgresql":
            using = " USING brin"
        return super().create_sql(model, schema_editor, using=using, **kwargs)
