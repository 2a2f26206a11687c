"""The CREATE TABLE that fits a destination's mapping: shown in the form, run by the platform only
when the owner ticks the option for it (`actions.create_table`).

Column types come from the event contract for the standard fields (`${ts}` is a timestamp,
`${device.id}` text of at most 63 characters…) and from a sample event for readings
(`${data.power}` is a number if the owner's meters send numbers). Upsert keys become the primary
key; an append table gets a surrogate identity key. The statement is built from validated names
quoted by the engine's quoting, and uses IF NOT EXISTS, so running it twice is harmless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import mapping, mysql, postgres

if TYPE_CHECKING:
    from .models import DatabaseDestination


def suggest(destination: DatabaseDestination, sample: dict[str, Any] | None = None) -> str:
    if sample is None:
        sample = mapping.sample_event(destination.owner_id if destination.owner_id else None)
    types = [
        (column, *mapping.suggested_family(expression, sample))
        for column, expression in destination.column_mapping
    ]
    engine = postgres if destination.engine == "postgres" else mysql
    return engine.ddl(destination.target(), types)
