"""Pods nobody follows: each launcher's lease on its run, and what a new launch,
``cost``, ``status`` and ``pods sweep`` do about the pods of an output whose launcher
is gone.

A launcher killed outright (SIGKILL, a lost laptop) leaves its pods to their watchdogs,
and a pod whose container never starts has none: it bills until someone ends it. So a
launcher holds ``{output}/_runs/launchers/<run id>.json`` (host, pid, a heartbeat)
while it follows its pods, and every launch first looks for this output's pods, in the
API (by name and ``PIPELINE_OUTPUT``) and in the ledger. It ends those whose launcher is
gone, refuses to start beside a live launcher's, and closes the ledger records of pods
the API no longer shows.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline.output.layout import OutputLayout
from pipeline.errors import PipelineError
from pipeline.output.ledger import PodLedger
from pipeline.runpod.orchestrator import POD_NAME_PREFIX, RunpodOrchestrator
from pipeline.runpod.pod_env import PodIdentity, decode_env
from pipeline.settings import declared

log = logging.getLogger("luigi-interface")

SWEEP_HINT = "python -m pipeline pods sweep {output}"


class LauncherLease:
    """This launcher's claim on its run's pods, renewed while it follows them and
    removed when it ends. Another launcher reads it to tell a live owner from a dead one."""

    def __init__(self, output: str, run_id: str, poll_seconds: float, clock: Callable[[], float] = time.time):
        self.path = OutputLayout.of(output).launcher_lease(run_id)
        self.run_id, self.poll_seconds, self.clock = run_id, poll_seconds, clock
        self._renewed = float("-inf")

    def renew(self, force: bool = False) -> None:
        """Write the heartbeat (at most every ten seconds unless forced)."""
        now = self.clock()
        if not force and now - self._renewed < 10:
            return
        lease = {"run_id": self.run_id, "host": socket.gethostname(), "machine": machine_id(), "pid": os.getpid(),
                 "heartbeat_epoch": now, "poll_seconds": self.poll_seconds}
        with storage.atomic_output(self.path) as staged:
            staged.path.write_text(json.dumps(lease, indent=2) + "\n", encoding="utf-8")
        self._renewed = now

    def release(self) -> None:
        storage.delete(self.path)


def machine_id() -> str:
    """This machine's id (systemd's), so two machines of one hostname are told apart."""
    try:
        return open("/etc/machine-id").read().strip()
    except OSError:
        return ""


def lease_is_live(lease: dict[str, Any], now: float) -> bool:
    """On this machine, a launcher is live while its process is (and has beaten in the
    last hour: a pid can be reused); from another machine, while its heartbeat is
    recent (five polls, and at least fifteen minutes). A lease that cannot be read is dead."""
    try:
        age = now - float(lease["heartbeat_epoch"])
        if lease.get("host") == socket.gethostname() and lease.get("machine", "") == machine_id():
            return storage.pid_alive(int(lease["pid"])) and age < 3600
        return age < max(5 * float(lease.get("poll_seconds") or 30), 900)
    except (KeyError, TypeError, ValueError):
        return False


def launchers(output: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, lease) of every launcher that has followed pods of this output and not
    released its lease: live ones, and dead ones (killed outright)."""
    folder = OutputLayout.of(output).launchers
    found = []
    for item in storage.list_files(folder, "*.json", hashes=False):
        try:
            lease = json.loads(storage.read_text(f"{folder}/{item.relative}"))
        except (FileNotFoundError, ValueError):
            continue  # released while we listed
        if isinstance(lease, dict) and lease.get("run_id"):
            found.append((f"{folder}/{item.relative}", lease))
    return found


def pod_env(pod: dict[str, Any]) -> dict[str, str]:
    """A pod's environment as the API lists it (``["NAME=value", …]``; ``{key, value}``
    pairs are read too)."""
    env = {}
    for item in pod.get("env") or []:
        if isinstance(item, dict) and "key" in item:
            env[str(item["key"])] = str(item.get("value", ""))
        elif isinstance(item, str) and "=" in item:
            name, value = item.split("=", 1)
            env[name] = value
    return {**env, **decode_env(env)}


def pod_run_id(pod: dict[str, Any]) -> str:
    """The run a pod belongs to: its launcher said so in its environment, else its name does."""
    said = PodIdentity.from_env(pod_env(pod)).run_id
    return said if said != PodIdentity.run_id else pod.get("name", "").removeprefix(POD_NAME_PREFIX).rsplit("-", 1)[0]


@dataclass
class Survey:
    """This output's pods: those the API still bills (by run), and the ledger's
    records of pods that are running by its account but gone from the API."""

    billed: list[dict[str, Any]] = field(default_factory=list)
    gone: list[dict[str, Any]] = field(default_factory=list)


def survey(orchestrator: RunpodOrchestrator, output: str) -> Survey:
    shown = {pod["id"]: pod for pod in orchestrator.list_pods()}
    billed = {pod_id: pod for pod_id, pod in shown.items()
              if pod.get("name", "").startswith(POD_NAME_PREFIX) and pod_env(pod).get(declared("output").env) == output}
    gone = []
    for record in orchestrator.ledger.records():
        if record["stopped_at_epoch"] is not None:
            continue
        if record["pod_id"] in shown:
            billed.setdefault(record["pod_id"], shown[record["pod_id"]])
        else:
            gone.append(record)
    return Survey(list(billed.values()), gone)


def end_pods(orchestrator: RunpodOrchestrator, pods: list[dict[str, Any]], reason: str) -> list[str]:
    """Terminate pods found in the API, first writing down any the ledger lacks (from
    their own environment and price), so what they cost is not lost."""
    for pod in pods:
        try:
            orchestrator.ledger.get(pod["id"])
        except FileNotFoundError:
            said = PodIdentity.from_env(pod_env(pod))  # what its launcher told it; the API fills the gaps
            price = float(pod.get("costPerHr") or said.price_per_hour)
            if not price:
                log.warning("runpod: pod %s shows no price (costPerHr) and none was listed: its record counts $0/h", pod["id"])
            identity = replace(said, name=said.name or pod.get("name", ""), run_id=pod_run_id(pod),
                               image=said.image or pod.get("imageName", ""))
            orchestrator.ledger.record(identity.ledger_record(pod["id"], price, int(pod.get("gpuCount") or 1), orchestrator.clock()))
        orchestrator.terminate_pod(pod["id"], reason=reason)
    return [pod["id"] for pod in pods]


def close_gone(orchestrator: RunpodOrchestrator, records: list[dict[str, Any]]) -> list[str]:
    """Close the records of pods the API no longer shows. Their real end is unknown (it
    was before now), so the dollars they show are an upper bound, and the reason says so."""
    for record in records:
        orchestrator.close_record(record["pod_id"], "gone: the API no longer showed it; it ended at or before this time")
        log.warning("runpod: pod %s (run %s) was RUNNING in the ledger but the API no longer shows it: record closed",
                    record["pod_id"], record["run_id"])
    return [record["pod_id"] for record in records]


def clear_the_way(orchestrator: RunpodOrchestrator, output: str) -> None:
    """Before a launch: end this output's pods whose launcher is gone, refuse to start
    beside a live launcher's, and close the records of pods that are gone."""
    now, leases = time.time(), launchers(output)
    live = {lease["run_id"]: lease for _, lease in leases if lease["run_id"] != orchestrator.run_id and lease_is_live(lease, now)}
    found = survey(orchestrator, output)
    if live:
        lease = next(iter(live.values()))
        followed = [pod["id"] for pod in found.billed if pod_run_id(pod) == lease["run_id"]]
        doing = f"is still following pod(s) {', '.join(followed)}" if followed else "is still running (no pod of it is billed yet)"
        raise PipelineError(
            f"run {lease['run_id']}'s launcher (pid {lease['pid']} on {lease['host']}) {doing} for {output}: "
            f"let it finish, or stop it (Ctrl-C){'; or end its pods with `' + SWEEP_HINT.format(output=output) + '`' if followed else ''}; "
            "no new pod was started")
    orphans = [pod for pod in found.billed if pod_run_id(pod) != orchestrator.run_id]
    for pod in orphans:
        log.warning("runpod: pod %s of run %s is still billed but its launcher is gone: terminating it", pod["id"], pod_run_id(pod))
    end_pods(orchestrator, orphans, f"orphan: its launcher was gone (ended by run {orchestrator.run_id})")
    close_gone(orchestrator, found.gone)
    for path, lease in leases:
        if lease["run_id"] != orchestrator.run_id:  # none is live, or we would have refused
            storage.delete(path)  # a dead launcher's: its pods are ended now


def sweep_output(orchestrator: RunpodOrchestrator, output: str) -> tuple[list[str], list[str]]:
    """``pods sweep``: end every billed pod of this output, whoever follows it, and close
    the records of pods that are gone. Returns (ended, closed)."""
    found = survey(orchestrator, output)
    return end_pods(orchestrator, found.billed, "ended by `pods sweep`"), close_gone(orchestrator, found.gone)


def gone_pods(output: str, api_key: Optional[str] = None) -> Optional[list[str]]:
    """Pods the ledger calls running that the API no longer shows; None when the API
    cannot be asked (no key) or nothing in the ledger is running."""
    from pipeline.runpod.orchestrator import PodSettings

    running = [r for r in PodLedger(output).records() if r["stopped_at_epoch"] is None]
    if not running or not (api_key or os.environ.get("RUNPOD_API_KEY")):
        return None
    orchestrator = RunpodOrchestrator(PodSettings(image="", api_attempts=3, api_max_wait=5), PodLedger(output), api_key=api_key)
    try:
        shown = {pod["id"] for pod in orchestrator.list_pods()}
    except PipelineError as exc:  # a report is still worth having without the API's word
        log.warning("could not ask the Runpod API which pods it still shows: %s", exc)
        return None
    return [r["pod_id"] for r in running if r["pod_id"] not in shown]
