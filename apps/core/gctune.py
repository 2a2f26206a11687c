"""Garbage-collector settings for the long-running hot loops: the MQTT listener and the Celery
workers that drain the delivery outbox.

With CPython's default (a young-generation collection every 700 net container allocations),
collections took ~13% of the listeners' and workers' CPU in bench-dbsink's 8,000 events/s
phase. A batch of 500 messages allocates tens of thousands of short-lived dicts and lists that
are all alive until the batch commits: at 700 they were promoted generation by generation and
then, dead, swept by full collections of the whole heap — Django's own objects included.

`tune()` moves everything alive at start (modules, settings, URL and model metadata) to the
permanent generation, which no collection visits again, and lets the young generation grow to
a few batches' worth before it is collected. Reference counting frees almost everything these
loops allocate anyway; the collector only has to find cycles, which costs a few megabytes of
delayed garbage at most.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune() -> None:
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
