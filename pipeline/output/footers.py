"""One pass over an output's published shards: their numbers from one listing, and each
shard's footer (its settings and the counts its run recorded) read once, without the rows.

Status, the run summary and the report total the same footers with the same code, so
they cannot disagree; verify, which reads the rows anyway, parses the footer of the
file it has open with ``ShardFooter.parse``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.core.shard_file import footer_settings
from pipeline.output.layout import OutputLayout

# What each shard's stats count, summed over an output by status, summary, report and verify.
COUNTS = ("documents", "embedded_documents", "rejected_documents", "chunks", "tokens")


@dataclass(frozen=True)
class ShardFooter:
    """One shard's footer: ``settings`` (model_id, dimension, precision, ...) and ``stats``
    (documents, chunks, tokens, started_at, finished_at, worker, device, ...)."""

    number: int
    path: str
    settings: dict[str, str]
    stats: dict[str, Any]

    @classmethod
    def parse(cls, number: int, path: str, raw: Optional[dict[bytes, bytes]]) -> "ShardFooter":
        """From a Parquet file's key-value metadata; ``stats`` is empty when the footer has none."""
        settings = footer_settings(raw)
        stats = settings.pop("stats", None)
        return cls(number, path, settings, json.loads(stats) if stats is not None else {})

    @classmethod
    def read(cls, number: int, path: str) -> "ShardFooter":
        with storage.open_for_reading(path) as f:
            return cls.parse(number, path, pq.ParquetFile(f).metadata.metadata)

    @property
    def span(self) -> tuple[dt.datetime, dt.datetime]:
        """When its run started and finished embedding it."""
        return dt.datetime.fromisoformat(self.stats["started_at"]), dt.datetime.fromisoformat(self.stats["finished_at"])


def read_footers(where: OutputLayout, numbers: Optional[Iterable[int]] = None,
                 on_footer: Optional[Callable[[int], None]] = None) -> list[ShardFooter]:
    """The footers of the published shards (one listing), or of the shards ``numbers``
    (no listing; a missing one raises). ``on_footer(count)`` is called after each
    footer read, with how many there are, for a progress bar."""
    paths = where.list_shards().numbers if numbers is None else {number: where.shard(number) for number in numbers}
    footers = []
    for number in sorted(paths):
        footers.append(ShardFooter.read(number, paths[number]))
        if on_footer:
            on_footer(len(paths))
    return footers


def active_seconds(intervals: list[tuple[dt.datetime, dt.datetime]]) -> float:
    """Seconds in which at least one shard was being embedded: the union of the
    intervals, so pauses between resumed runs do not count and parallel workers
    are not counted twice."""
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += (current_end - current_start).total_seconds()
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += (current_end - current_start).total_seconds()
    return total


@dataclass
class FooterTotals:
    """What a set of footers adds up to."""

    shards: int = 0
    counts: Counter = field(default_factory=Counter)  # COUNTS summed
    rejected_by_reason: Counter = field(default_factory=Counter)
    compute_seconds: float = 0.0  # the shards' own seconds, summed over workers
    busy_seconds: float = 0.0  # active_seconds of their spans
    started: Optional[dt.datetime] = None
    finished: Optional[dt.datetime] = None
    workers: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # the first shard's

    def per_second(self, count: str) -> float:
        return self.counts[count] / self.busy_seconds if self.busy_seconds > 0 else 0.0


def total(footers: list[ShardFooter]) -> FooterTotals:
    totals = FooterTotals(shards=len(footers), settings=footers[0].settings if footers else {})
    for footer in footers:
        totals.counts.update({key: footer.stats[key] for key in COUNTS})
        totals.rejected_by_reason.update(footer.stats.get("rejected_by_reason", {}))
        totals.compute_seconds += float(footer.stats.get("seconds", 0.0))
    spans = [footer.span for footer in footers]
    if spans:
        totals.started, totals.finished = min(s for s, _ in spans), max(f for _, f in spans)
    totals.busy_seconds = active_seconds(spans)
    totals.workers = sorted({f.stats.get("worker", "") for f in footers} - {""})
    totals.devices = sorted({f.stats.get("device", "") for f in footers} - {""})
    totals.precisions = sorted({f.settings.get("precision", "") for f in footers})
    return totals
