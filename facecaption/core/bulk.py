"""Requests over every shard at once (work selection, status, the dataset report) turn tens
of thousands of state rows into small objects. None of them forms a reference cycle, so
reference counting frees them all; yet each few hundred new objects start CPython's cyclic
collector, and at 5,000 shards (25,000 stage rows) a request ran two or three full
collections, each scanning every object alive in the process: a third of its time.
`collector_paused` holds the cyclic collector off while such a request builds its objects.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block (what is not in a cycle is still
    freed at once; a cycle made meanwhile waits for the next collection). A block that found
    the collector off (inside another block, or while another thread's block runs) leaves it
    off, so it is never left off for good; at worst it comes back on during another thread's
    block, which costs only that block's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
