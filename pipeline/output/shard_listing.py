"""Which shards of an output are published, from one listing of its ``shards/`` folder
per process every few seconds, shared by every shard task's ``complete()`` and the web
view's figures.

Luigi asks each task whether it is complete when it schedules it: one request per
shard, 10,000 per worker start at 10 million documents on a bucket, and again in each
pass of ``EmbedAll.run``. One listing answers them all. A listing can be a few seconds
old, so a shard another worker has just published may be called missing: its task then
finds it published when it starts and does nothing (``EmbedShard.run``), and a shard is
only ever published once (``atomic_output(overwrite=False)``). ``EmbedAll.requires()``
lists afresh, since Luigi checks a run task's shards just before running it, when every
shard the scheduler calls done must be seen done.
"""

from __future__ import annotations

import threading
import time

from pipeline.output.layout import Listing, OutputLayout

MAX_AGE_SECONDS = 5.0

_listings: dict[str, tuple[float, Listing]] = {}
_lock = threading.Lock()


def published_shards(output: str, clock=time.monotonic) -> Listing:
    """The output's published shards, listed at most every ``MAX_AGE_SECONDS`` per process."""
    with _lock:
        known = _listings.get(output)
        if known and clock() - known[0] < MAX_AGE_SECONDS:
            return known[1]
    listing = OutputLayout.of(output).list_shards()
    with _lock:
        _listings[output] = (clock(), listing)
    return listing


def note_published(output: str, shard: int) -> None:
    """This process has just published ``shard``: its own next look sees it at once."""
    with _lock:
        known = _listings.get(output)
        if known:
            known[1].numbers[shard] = OutputLayout.of(output).shard(shard)


def forget_listings(output: str | None = None) -> None:
    """List afresh: before another build in this process (every output), or when a run
    task asks for its shards (``output``), which Luigi does as it schedules it and again
    just before it runs it, when every shard the scheduler calls done must be seen done."""
    with _lock:
        if output is None:
            _listings.clear()
        else:
            _listings.pop(output, None)
