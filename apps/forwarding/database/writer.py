"""Writing one batch: one transaction, one multi-row statement (or COPY) — and, when the server
rejects the batch for its content, a bisection that finds the rows at fault.

Bisection runs inside the same transaction, each part under a savepoint: a rejected part is
rolled back to its savepoint and split in two, down to single rows, which are the bad ones. One
poison row in 1,000 costs about 2·log2(1000) ≈ 20 statements, and the 999 others are committed
together. A deadline bounds the search (a batch where every row is bad would take 2n
statements): what it did not reach is retried later rather than blocking the destination.

Any failure that is not about content (connection, timeout, missing table, login…) aborts the
whole transaction and is raised to the caller as a classified `SinkError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .base import ErrorClass, SinkError, Target

log = logging.getLogger(__name__)

SPLIT_DEADLINE = 15.0  # seconds of bisection per batch, at most


@dataclass
class Written:
    """What became of a batch's rows, by their index in the batch."""

    written: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # index -> the server's error
    postponed: list[int] = field(default_factory=list)  # bisection ran out of time
    statements: int = 0


def write_batch(
    engine: ModuleType,
    conn: Any,
    target: Target,
    rows: Sequence[Sequence[Any]],
    indexes: Sequence[int],
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Written:
    """Write `rows` (already converted; `indexes[i]` is row i's index in the batch)."""
    deadline = deadline if deadline is not None else clock() + SPLIT_DEADLINE
    result = Written()
    if not rows:
        return result
    try:
        with engine.transaction(conn):
            # Parts still to write, first part last (a stack); each is a (start, end) slice.
            parts: list[tuple[int, int]] = [(0, len(rows))]
            while parts:
                start, end = parts.pop()
                if result.statements and clock() > deadline:
                    result.postponed.extend(indexes[start:end])
                    continue
                result.statements += 1
                try:
                    with engine.savepoint(conn):
                        engine.write(conn, target, rows[start:end])
                except Exception as exc:
                    error = engine.classify(exc)
                    if error.kind is not ErrorClass.CONTENT:
                        raise error from exc
                    if end - start == 1:
                        result.rejected[indexes[start]] = error.message
                    else:
                        middle = (start + end) // 2
                        parts.append((middle, end))
                        parts.append((start, middle))
                    continue
                result.written.extend(indexes[start:end])
    except SinkError:
        raise
    except Exception as exc:  # the commit itself, or the transaction's own statements
        raise engine.classify(exc) from exc
    if result.rejected:
        log.info(
            "batch of %d: %d rejected rows isolated in %d statements",
            len(rows),
            len(result.rejected),
            result.statements,
        )
    return result
