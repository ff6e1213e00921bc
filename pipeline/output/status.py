"""``python -m pipeline status OUTPUT``: where a run stands, from what it leaves behind.

Shards done and their figures come from the shard files (the checkpoint) and their
stats, dollars from the pod ledger, so no scheduler needs to be running. Shards
running or failed come from Luigi's task history (the sqlite file luigid writes,
``[task_history] db_connection``) when there is one: the last event recorded for a
shard that is not done says whether it was last seen running or failing.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline.output import layout
from pipeline.output.layout import OutputLayout, require_manifest
from pipeline.output.shard_listing import published_shards
from pipeline.core.corpus import manifest_info
from pipeline.core.sync import describe_sync, last_sync
from pipeline.output.ledger import cost_report
from pipeline.core.progress import format_duration
from pipeline.output.footers import ShardFooter, read_footers, total


def count_shards(output: str) -> int:
    """Shards published in an output: one listing, no file opened."""
    return len(OutputLayout.of(output).list_shards().numbers)


@dataclass
class RunFigures:
    done: int
    total: int
    shards_per_hour: float
    tokens_per_second: float
    eta: str  # "done", "unknown" or a duration
    percent: int
    made_by: tuple[str, ...] = ()  # the pods (pod_id) of the shards first seen in this look


DOLLARS_EVERY_SECONDS = 30.0


class RunWatch:
    """The whole run's progress as one process sees it, cheap enough to ask often:
    shards published (one listing), the rates since this watch first looked (every
    worker's shards count; each new shard's footer is read once, for its tokens), and,
    in ``figures``, dollars from the pod ledger (the launcher counts its run's own)."""

    def __init__(self, output: str, total: int, clock=time.monotonic, shared_listing: bool = False):
        """``shared_listing``: take the shards from this process's listing of them, a few
        seconds old at most (``shard_listing``), and the dollars from a look at the ledger
        at most every ``DOLLARS_EVERY_SECONDS``: for a worker, which posts figures as each
        of its shards starts and ends. The launcher, whose deadlines count on them, looks
        afresh each time."""
        self.output, self.total, self.clock, self.shared_listing = output, total, clock, shared_listing
        self._dollars: Optional[tuple[float, float]] = None  # (when, dollars)
        self.first: Optional[tuple[float, int]] = None
        self.seen: set[str] = set()
        self.tokens = 0  # in shards published since the first look
        self.failed: set[int] = set()  # shards that failed here and have not been made since

    def snapshot(self) -> RunFigures:
        published = dict((published_shards(self.output) if self.shared_listing else OutputLayout.of(self.output).list_shards()).numbers)
        names = set(published.values())
        done, now = len(names), self.clock()
        if self.first is None:
            self.first, self.seen = (now, done), names
        made_by = []
        for number in sorted(n for n, name in published.items() if name not in self.seen):
            try:
                stats = ShardFooter.read(number, published[number]).stats
            except Exception:  # a figure on a screen is no reason to fail
                continue
            self.tokens += int(stats.get("tokens") or 0)
            if stats.get("pod_id"):
                made_by.append(stats["pod_id"])
        self.seen |= names
        elapsed, made = now - self.first[0], done - self.first[1]
        rate = made / elapsed * 3600 if elapsed > 0 and made > 0 else 0.0
        eta = "done" if done >= self.total else (format_duration((self.total - done) / rate * 3600) if rate else "unknown")
        return RunFigures(done, self.total, rate, self.tokens / elapsed if elapsed > 0 else 0.0, eta,
                          int(100 * done / self.total) if self.total else 100, tuple(made_by))

    def figures(self) -> tuple[str, int]:
        """(status message, percent): shards done/total, shards/h, tokens/s, ETA and
        dollars, and the shards that failed in this process."""
        f = self.snapshot()
        message = (f"{f.done}/{f.total} shards done, {f.shards_per_hour:.1f} shards/h, {f.tokens_per_second:,.0f} tokens/s, "
                   f"ETA {f.eta}, ${self.dollars():.2f} spent")
        if self.failed:
            message += f"; failed: shard {', '.join(str(s) for s in sorted(self.failed))}"
        return message, f.percent

    def dollars(self) -> float:
        now = self.clock()
        if not self.shared_listing or self._dollars is None or now - self._dollars[0] >= DOLLARS_EVERY_SECONDS:
            self._dollars = (now, cost_report(self.output)["dollars"])
        return self._dollars[1]


def history_file(db_connection: str) -> Optional[Path]:
    """The sqlite file of a ``sqlite:///path`` connection string (None for other databases)."""
    prefix = "sqlite:///"
    return Path(db_connection[len(prefix):]) if db_connection.startswith(prefix) else None


def _same_output(recorded: str, output: str) -> bool:
    if recorded.rstrip("/") == output.rstrip("/"):
        return True
    if storage.is_remote(recorded) or storage.is_remote(output):
        return False
    return storage.local_path(recorded).resolve() == storage.local_path(output).resolve()


def shard_events(history: Path, output: str) -> dict[int, tuple[str, str]]:
    """{shard: (last event, its time)} for this output's EmbedShard tasks in a Luigi task
    history database."""
    with sqlite3.connect(f"file:{history}?mode=ro", uri=True) as db:
        rows = db.execute(
            """select shard.value, output.value, event.event_name, event.ts
               from tasks task
               join task_parameters shard on shard.task_id = task.id and shard.name = 'shard'
               join task_parameters output on output.task_id = task.id and output.name = 'output'
               join task_events event on event.task_id = task.id
               where task.name = 'EmbedShard'
               order by event.ts, event.id"""
        ).fetchall()
    latest: dict[int, tuple[str, str]] = {}
    for shard, recorded_output, event, when in rows:
        if _same_output(recorded_output, output):
            latest[int(shard)] = (event, str(when))
    return latest


def run_status(output: str, history: Optional[Path] = None,
               gone_pods: Optional[Callable[[str], list[str]]] = None) -> dict[str, Any]:
    """Shards done, failed and running, documents, throughput, ETA and dollars for an output.
    ``gone_pods(output)``: the ledger's running pods that Runpod no longer has (the
    command line asks Runpod; without it, ``pods_gone`` is None)."""
    where = OutputLayout.of(output)
    info = manifest_info(require_manifest(where))
    total_shards = int(info["shards"])
    footers = read_footers(where)
    totals = total(footers)
    events = shard_events(history, output) if history and history.exists() else {}
    running, failed = unfinished_shards(events, done={footer.number for footer in footers})
    shards_per_hour = totals.shards / totals.busy_seconds * 3600 if totals.busy_seconds > 0 else 0.0
    remaining = total_shards - totals.shards
    cost = cost_report(output)
    return {
        "output": output,
        "shards": total_shards,
        "done": totals.shards,
        "running": running,
        "failed": failed,
        "history": str(history) if events else None,
        "documents": int(info["documents"]) if "documents" in info else None,
        "documents_done": totals.counts["documents"],
        "rejected_documents": totals.counts["rejected_documents"],
        "chunks": totals.counts["chunks"],
        "tokens": totals.counts["tokens"],
        "tokens_per_second": totals.per_second("tokens"),
        "shards_per_hour": shards_per_hour,
        "eta_seconds": remaining / shards_per_hour * 3600 if shards_per_hour and remaining else (0.0 if not remaining else None),
        "workers": totals.workers,
        "finished": storage.exists(where.summary),
        "dollars": cost["dollars"],
        "pods_running": cost["running"],
        "pods_gone": gone_pods(output) if cost["running"] and gone_pods else None,
        "sync": last_sync(output),
    }


def unfinished_shards(events: dict[int, tuple[str, str]], done: set[int]) -> tuple[list[int], list[int]]:
    """(running, failed): the shards not published whose latest task event in the
    scheduler's history says so."""
    running = sorted(s for s, (event, _) in events.items() if event == "RUNNING" and s not in done)
    failed = sorted(s for s, (event, _) in events.items() if event == "FAILED" and s not in done)
    return running, failed


def format_status(status: dict[str, Any]) -> str:
    s = status
    eta = "done" if s["eta_seconds"] == 0 else (format_duration(s["eta_seconds"]) if s["eta_seconds"] else "unknown")
    lines = [
        f"{s['output']}: {s['done']}/{s['shards']} shards done" + (f", finished ({layout.SUMMARY})" if s["finished"] else ""),
        f"running: {shard_list(s['running'])}; failed: {shard_list(s['failed'])}"
        + (f" (task history {s['history']})" if s["history"] else " (no task history: running and failed shards unknown)"),
        f"documents: {s['documents_done']:,} of {s['documents']:,} in done shards ({s['rejected_documents']:,} rejected); "
        f"{s['chunks']:,} chunks, {s['tokens']:,} tokens",
        f"throughput: {s['tokens_per_second']:,.0f} tokens/s, {s['shards_per_hour']:.1f} shards/h "
        f"while shards were being made, by {len(s['workers'])} worker process(es); ETA {eta}",
        f"cost: ${s['dollars']:.4f} on Runpod" + (f"; {s['pods_running']} pod(s) still running" if s["pods_running"] else ""),
    ]
    if s.get("sync"):
        lines.append(f"sync: {describe_sync(s['sync'])}")
    if s["pods_gone"]:
        lines.append(f"  of which {', '.join(s['pods_gone'])} the Runpod API no longer shows: "
                     f"`python -m pipeline pods sweep {s['output']}` closes their records")
    return "\n".join(lines)


def shard_list(shards: list[int]) -> str:
    if not shards:
        return "none"
    shown = ", ".join(str(s) for s in shards[:20])
    return f"{len(shards)} ({shown}{', …' if len(shards) > 20 else ''})"
