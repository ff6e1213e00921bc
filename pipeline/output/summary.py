"""The run summary, ``{output}/_SUCCESS.json``, built from the shards' own stats.

Everything is read back from the published shards, so the summary is right however
many runs, resumes and workers it took to make them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from typing import Any

from pipeline import storage
from pipeline.output.layout import OutputLayout
from pipeline.core.shard_file import shard_metadata

COUNTED = ("documents", "embedded_documents", "rejected_documents", "chunks", "tokens", "seconds")


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


def run_summary(output: str, total_shards: int, parameters: dict[str, Any]) -> dict[str, Any]:
    layout = OutputLayout.of(output)
    metadata = [shard_metadata(layout.shard(i)) for i in range(total_shards)]
    stats = [json.loads(m["stats"]) for m in metadata]
    settings = metadata[0]
    total, reasons = Counter(), Counter()
    for s in stats:
        total.update({k: s[k] for k in COUNTED})
        reasons.update(s["rejected_by_reason"])
    intervals = [(dt.datetime.fromisoformat(s["started_at"]), dt.datetime.fromisoformat(s["finished_at"])) for s in stats]
    started, finished = min(i[0] for i in intervals), max(i[1] for i in intervals)
    wall = max(active_seconds(intervals), 1e-9)
    return {
        "parameters": parameters,
        "output": output,
        "shards": total_shards,
        "documents": total["documents"],
        "embedded_documents": total["embedded_documents"],
        "rejected_documents": total["rejected_documents"],
        "rejected_by_reason": dict(sorted(reasons.items())),
        "chunks": total["chunks"],
        "tokens": total["tokens"],
        "model": settings["model_id"],
        "model_profile": settings["model_profile"],
        "dimension": int(settings["dimension"]),
        "prefix": settings["prefix"],
        "max_tokens": int(settings["max_tokens"]),
        "precision": sorted({m["precision"] for m in metadata}),
        "devices": sorted({s["device"] for s in stats}),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "elapsed_seconds": round((finished - started).total_seconds(), 3),
        "wall_seconds": round(wall, 3),
        "compute_seconds": round(total["seconds"], 3),
        "documents_per_second": round(total["documents"] / wall, 3),
        "chunks_per_second": round(total["chunks"] / wall, 3),
        "tokens_per_second": round(total["tokens"] / wall, 1),
        "pipeline_version": settings["version"],
        "cost": _cost(output),
    }


def _cost(output: str) -> dict[str, Any]:
    """Dollars spent on Runpod pods for this output (zero for a local run)."""
    from pipeline.output.ledger import cost_report

    report = cost_report(output)
    return {"dollars": report["dollars"], "pods": len(report["pods"]), "runs": len(report["runs"])}


def publish_summary(output: str, summary: dict[str, Any]) -> None:
    """Write ``{output}/_SUCCESS.json`` in one step: it is what says the run is done."""
    with storage.atomic_output(OutputLayout.of(output).summary) as staged:
        staged.path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
