"""The run summary, ``{output}/_SUCCESS.json``, built from the shards' own stats.

Everything is read back from the published shards, so the summary is right however
many runs, resumes and workers it took to make them.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import storage
from pipeline.output.layout import OutputLayout
from pipeline.output.footers import read_footers, total


def run_summary(output: str, total_shards: int, parameters: dict[str, Any]) -> dict[str, Any]:
    """The summary of shards 0..total_shards-1 (all must be published)."""
    footers = read_footers(OutputLayout.of(output), range(total_shards))
    totals, settings = total(footers), footers[0].settings
    wall = max(totals.busy_seconds, 1e-9)
    return {
        "parameters": parameters,
        "output": output,
        "shards": total_shards,
        "documents": totals.counts["documents"],
        "embedded_documents": totals.counts["embedded_documents"],
        "rejected_documents": totals.counts["rejected_documents"],
        "rejected_by_reason": dict(sorted(totals.rejected_by_reason.items())),
        "chunks": totals.counts["chunks"],
        "tokens": totals.counts["tokens"],
        "model": settings["model_id"],
        "model_profile": settings["model_profile"],
        "dimension": int(settings["dimension"]),
        "prefix": settings["prefix"],
        "max_tokens": int(settings["max_tokens"]),
        "precision": totals.precisions,
        "devices": totals.devices,
        "started_at": totals.started.isoformat(),
        "finished_at": totals.finished.isoformat(),
        "elapsed_seconds": round((totals.finished - totals.started).total_seconds(), 3),
        "wall_seconds": round(wall, 3),
        "compute_seconds": round(totals.compute_seconds, 3),
        "documents_per_second": round(totals.counts["documents"] / wall, 3),
        "chunks_per_second": round(totals.counts["chunks"] / wall, 3),
        "tokens_per_second": round(totals.counts["tokens"] / wall, 1),
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
