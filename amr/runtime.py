"""Interpreter settings for the processes that ingest readings."""

from __future__ import annotations

import gc

# young objects before a collection, then collections of each generation before the next
# one up is collected; CPython's defaults are (700, 10, 10)
GC_THRESHOLDS = (10_000, 50, 100)


def tune_gc() -> None:
    """Let CPython's cycle collector walk the objects of a batch in flight less often.

    A batch of 50,000 readings keeps a few hundred thousand tuples alive until
    it is stored. With the default thresholds the collector walks them again
    at every older-generation pass, which cost a sixth of the ingestion CPU:
    `bench/ingest.py --gc-defaults` stores about 161,000 readings/s, against
    about 190,000 with these thresholds.
    Ingestion makes no reference cycles that need freeing soon: reference
    counting frees its garbage, and the collector still runs.
    """
    gc.set_threshold(*GC_THRESHOLDS)
