"""The run summary, ``{output}/_SUCCESS.json``, built from the shards' own stats.

Everything is read back from the published shards, so the summary is right however
many runs, resumes and workers it took to make them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

from .shard_job import shard_path
from .shards import shard_metadata, shard_stats


def _seconds_between(first: str, last: str) -> float:
    return (dt.datetime.fromisoformat(last) - dt.datetime.fromisoformat(first)).total_seconds()


def run_summary(corpus: str, output: str, total_shards: int) -> dict[str, Any]:
    stats = [shard_stats(shard_path(output, i)) for i in range(total_shards)]
    settings = shard_metadata(shard_path(output, 0))
    total = Counter()
    reasons = Counter()
    for s in stats:
        total.update({k: s[k] for k in ("documents", "embedded_documents", "rejected_documents", "chunks", "tokens", "seconds")})
        reasons.update(s["rejected_by_reason"])
    started = min(s["started_at"] for s in stats)
    finished = max(s["finished_at"] for s in stats)
    wall = max(_seconds_between(started, finished), 1e-9)
    return {
        "corpus": corpus,
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
        "precision": settings["precision"],
        "started_at": started,
        "finished_at": finished,
        "wall_seconds": round(wall, 3),
        "compute_seconds": round(total["seconds"], 3),
        "documents_per_second": round(total["documents"] / wall, 3),
        "chunks_per_second": round(total["chunks"] / wall, 3),
        "tokens_per_second": round(total["tokens"] / wall, 1),
        "pipeline_version": settings["version"],
    }
