"""The pod ledger: every Runpod pod of an output (``OutputLayout.pods``) with its GPU
type, hourly price, start and stop, so "what has this cost" is a read, not a guess.
The launcher writes it (``runpod.orchestrator``); status, the summary and the report
read it here, without the Runpod SDK."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Optional

from pipeline import storage
from pipeline.output.layout import OutputLayout


def now_iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


def ledger_record(pod_id: str, name: str, run_id: str, gpu_type: str, gpu_count: int, cloud_type: str,
                  price: float, image: str, started: float) -> dict[str, Any]:
    """One pod's ledger entry (the launcher writes it; the watchdog if the launcher died).

    Args:
        pod_id: Runpod's id of the pod.
        name: the pod's unique name (how a lost create is found again).
        run_id: the launch that started it.
        gpu_type: the GPU type it got.
        gpu_count: its GPUs.
        cloud_type: ``SECURE`` or ``COMMUNITY``.
        price: dollars per hour, as billed.
        image: the image it runs.
        started: when it was created, epoch seconds.
    """
    return {
        "pod_id": pod_id, "name": name, "run_id": run_id, "gpu_type": gpu_type, "gpu_count": gpu_count,
        "cloud_type": cloud_type, "price_per_hour": price, "image": image,
        "started_at": now_iso(started), "started_at_epoch": started,
        "stopped_at": None, "stopped_at_epoch": None, "end_reason": None,
    }


class PodLedger:
    """Every pod of an output: ``{output}/_runs/pods/{pod_id}.json`` with its GPU type,
    hourly price, start and stop, so "what has this cost" is a read, not a guess."""

    def __init__(self, output: str):
        self.layout = OutputLayout.of(output)

    def record(self, pod: dict[str, Any]) -> None:
        with storage.atomic_output(self.layout.pod_record(pod["pod_id"])) as staged:
            staged.path.write_text(json.dumps(pod, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @staticmethod
    def mark_ended(record: dict[str, Any], reason: str, now: float) -> None:
        """Set the stop time and reason of a record that has none yet."""
        if record["stopped_at_epoch"] is None:
            record.update(stopped_at=now_iso(now), stopped_at_epoch=now, end_reason=reason)

    def get(self, pod_id: str) -> dict[str, Any]:
        return json.loads(storage.read_text(self.layout.pod_record(pod_id)))

    def records(self, ended: Optional[dict[str, dict[str, Any]]] = None) -> list[dict[str, Any]]:
        """Every record, from one listing. ``ended``: the records of ended pods read before,
        which never change, kept here and not read again: a launcher looking every few
        seconds then reads a listing and its running pods' records, not every pod ever run."""
        folder, records = self.layout.pods, []
        for item in storage.list_files(folder, "*.json", hashes=False):
            record = ended.get(item.relative) if ended is not None else None
            if record is None:
                record = json.loads(storage.read_text(f"{folder}/{item.relative}"))
                if ended is not None and record["stopped_at_epoch"] is not None:
                    ended[item.relative] = record
            records.append(dict(record))
        return records

    @staticmethod
    def dollars(pod: dict[str, Any], now: Optional[float] = None) -> float:
        end = pod["stopped_at_epoch"] or (now if now is not None else time.time())
        return max(end - pod["started_at_epoch"], 0) / 3600 * pod["price_per_hour"]


def cost_report(output: str, now: Optional[float] = None, ended: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """Dollars per pod, per run and in total, from the ledger (running pods up to now);
    per run also what its running pods cost an hour and when the oldest of them began.
    ``ended``: a launcher's records of ended pods, kept across its looks (``records``)."""
    pods = sorted(PodLedger(output).records(ended), key=lambda p: p["started_at_epoch"])
    runs: dict[str, dict[str, Any]] = {}
    for pod in pods:
        pod["dollars"] = round(PodLedger.dollars(pod, now), 6)
        pod["hours"] = round(((pod["stopped_at_epoch"] or (now or time.time())) - pod["started_at_epoch"]) / 3600, 6)
        run = runs.setdefault(pod["run_id"], {"run_id": pod["run_id"], "pods": 0, "dollars": 0.0, "running": 0,
                                              "dollars_per_hour": 0.0, "oldest_running_epoch": None})
        run["pods"] += 1
        run["dollars"] = round(run["dollars"] + pod["dollars"], 6)
        if pod["stopped_at_epoch"] is None:
            run["running"] += 1
            run["dollars_per_hour"] += pod["price_per_hour"]
            run["oldest_running_epoch"] = run["oldest_running_epoch"] or pod["started_at_epoch"]  # pods come oldest first
    return {
        "pods": pods,
        "runs": list(runs.values()),
        "dollars": round(sum(p["dollars"] for p in pods), 6),
        "running": sum(p["stopped_at_epoch"] is None for p in pods),
        # Billed at a price the API never told (none listed, no costPerHr): not in "dollars".
        "price_unknown": [p["pod_id"] for p in pods if p.get("price_unknown")],
    }
