"""One launch of pods for an output, from the first pod started to the last one ended.

``PodRun.run()`` launches the run's pods, follows them (the live line, the shards
appearing, the spend), replaces spot pods taken back, ends pods past a limit of the
launcher's own (spend, the first shard's and the next shard's deadlines, runtime), and
on SIGINT/SIGTERM ends them at once; whatever happens, every pod it started is ended
before it returns or raises. It is plain code under the Luigi task (``launcher.py``),
which keeps no state of its own.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from pipeline.core.progress import LiveLine, format_duration
from pipeline.errors import PipelineError
from pipeline.output.ledger import PodLedger, cost_report
from pipeline.output.status import RunWatch, count_shards
from pipeline.runpod.launcher_limits import RunGuard, RunLimits
from pipeline.runpod.orchestrator import ApiKeyRefused, PodError, PodLimit, RunpodOrchestrator
from pipeline.runpod.orphans import LauncherLease, clear_the_way

log = logging.getLogger("luigi-interface")


class PodEnded(PipelineError):
    """The pod stopped before the work was done (a crash, a watchdog limit)."""


class LauncherStopped(PipelineError):
    """SIGINT or SIGTERM: the pods are ended, and the task fails with one line."""


@dataclass(frozen=True)
class PodRunSettings:
    """What a launch needs from the launcher's parameters."""

    output: str
    pods: int  # pods working at once
    spot: bool
    spot_relaunches: int  # taken-back spot pods replaced before giving up
    max_dollars: float  # for the whole run, shared by its pods
    poll_seconds: float
    provisioning_seconds: float
    limits: RunLimits


class PodRun:
    """Args:
        settings: the launch's settings.
        make_orchestrator: builds the orchestrator, given the sleep it must use (one that
            wakes at once on SIGINT/SIGTERM).
        total_shards: the manifest's shard count.
        work_done: whether the pods' EmbedAll has written its summary.
        show: the live line for the web view, ``show(text, percent)``.
    """

    def __init__(self, settings: PodRunSettings, make_orchestrator: Callable[[Callable[[float], None]], RunpodOrchestrator],
                 total_shards: Callable[[], int], work_done: Callable[[], bool], show: Callable[[str, int], None]):
        self.settings, self.total_shards, self.work_done, self.show_in_web_view = settings, total_shards, work_done, show
        self._stopping = threading.Event()  # set by SIGINT/SIGTERM: every wait ends at once
        self._orchestrator = make_orchestrator(self._pause)
        self._pods: list[str] = []  # every pod this run started
        self._live: list[str] = []  # those it follows now
        self._ended: int | None = None  # how many of them _end_pods has ended
        self._end_reason = ""
        self._last_statuses: dict[str, dict | None] = {}  # the pods' states at the last look
        self._ended_records: dict[str, dict] = {}  # ledger records of ended pods, read once (PodLedger.records)
        self._guard = RunGuard(settings.limits, clock=self._orchestrator.clock)
        self._lease = LauncherLease(settings.output, self._orchestrator.run_id, settings.poll_seconds)
        self._line = LiveLine(log)
        self._watch = RunWatch(settings.output, total_shards())  # one for the run: rates and who made what

    def run(self) -> None:
        """Launch, follow and end the pods; returns when the work is done, raises when it
        cannot be. Every pod this run started has ended when it returns or raises."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._lease.renew(force=True)
            clear_the_way(self._orchestrator, self.settings.output)
            self._say_what_earlier_launches_spent()
            self._follow_until_done()
        except PodLimit as exc:
            self._end_reason = self._end_reason or f"launcher: {exc.reason}"
            resume = ("rerun with a larger --max-dollars (the output's budget over all its launches) to resume"
                      if exc.reason.startswith("spend limit") else "rerun to resume")
            raise PodLimit(f"{exc}; {resume} (finished shards are kept)") from None
        finally:
            failing = sys.exc_info()[1] is not None
            try:
                self._end_all(self._end_reason or ("launcher finished" if self.work_done() else "launcher stopped"), failing)
            finally:
                self._line.close()
                for number, handler in previous.items():
                    signal.signal(number, handler)

    def _end_all(self, reason: str, failing: bool) -> None:
        """The run's last word: end every pod (a create in flight during a signal may have
        made one since the handler ended the others) and release the lease; one more try
        when that fails. When the run itself failed, its error is the one to show: this
        one is logged."""
        for attempt in (1, 2):
            try:
                self._end_pods(reason, again=True)
                self._lease.release()
                return
            except Exception as exc:
                if isinstance(exc, ApiKeyRefused) and not self._pods:
                    return  # the key that was refused created nothing: no pod to end, nothing to check
                if attempt == 1:
                    log.error("ending this run's pods: %s; trying again", exc)
                    continue
                message = f"ending this run's pods failed ({exc}): check the Runpod console"
                if not failing:
                    raise PipelineError(message) from exc
                log.error(message)

    def _follow_until_done(self) -> None:
        live = self._live
        for _ in range(self.settings.pods):
            live.append(self._launch())
        replaced = 0
        while True:
            ended = self._follow(live)
            if not ended:
                return
            live[:] = [pod_id for pod_id in live if pod_id not in ended]
            for pod_id in ended:
                taken_back = self.settings.spot and not self._ended_by_its_watchdog(pod_id)
                self._orchestrator.terminate_pod(pod_id, reason="spot pod taken back" if taken_back else self._why_ended(pod_id))
                if taken_back and replaced < self.settings.spot_relaunches:
                    # A new pod resumes from the published shards.
                    replaced += 1
                    log.warning("pod %s, a spot pod, was taken back; a new one takes over (%d of %d)",
                                pod_id, replaced, self.settings.spot_relaunches)
                    live.append(self._launch())
                elif live:
                    log.warning("pod %s ended before the run was done; %d other pod(s) go on with its shards", pod_id, len(live))
            if not live:
                done, total = count_shards(self.settings.output), self.total_shards()
                raise PodEnded(f"pod(s) {', '.join(ended)} ended before the work was done ({done}/{total} shards); rerun to resume")

    def _launch(self) -> str:
        self._stop_if_signalled()
        self._budget_the_next_pod()
        pod_id = self._orchestrator.start_pod(limit=lambda: self._while_starting(None))
        self._pods.append(pod_id)
        self._stop_if_signalled()  # a create in flight when the signal came: run's finally ends it
        try:
            self._orchestrator.wait_until_running(pod_id, limit=lambda: self._while_starting(pod_id))
        except PodError:
            self._stop_if_signalled()  # a pod the signal handler ended "disappeared": say why
            raise
        self._guard.pod_running(pod_id)
        return pod_id

    def _why_ended(self, pod_id: str) -> str:
        """Why a pod ended before the run was done, as far as anyone can tell: gone from
        the API while neither this launcher nor its watchdog ended it means someone else
        terminated it; otherwise its container stopped (the watchdog's own reason, when it
        wrote one, stays in the ledger)."""
        if self._last_statuses.get(pod_id) is None and not self._ended_by_its_watchdog(pod_id):
            return "terminated outside this launcher and its watchdog (the Runpod console or the API)"
        return "ended before the run was done"

    def _ended_by_its_watchdog(self, pod_id: str) -> bool:
        """Whether the pod ended itself (its record says why): work done or a limit,
        not a spot pod taken back."""
        try:
            return str(PodLedger(self.settings.output).get(pod_id).get("end_reason") or "").startswith("watchdog:")
        except FileNotFoundError:
            return False

    def _run_spend(self) -> tuple[float, float, float | None]:
        """(dollars the output has spent over all its launches, this one's included, dollars
        per hour this launch's running pods cost, when its oldest running pod was
        created), from the ledger: each pod's own billed price. ``--max-dollars`` bounds
        the first: a rerun, or a retry loop, never gets a fresh budget."""
        report = self._ledger_report()
        run = next((r for r in report["runs"] if r["run_id"] == self._orchestrator.run_id), None)
        return (report["dollars"], run["dollars_per_hour"], run["oldest_running_epoch"]) if run else (report["dollars"], 0.0, None)

    def _ledger_report(self) -> dict:
        return cost_report(self.settings.output, self._orchestrator.clock(), self._ended_records)

    def _one_look_of_a_pod(self, report: dict) -> float:
        """What a pod of this output costs over one look (``--poll-seconds``), at the
        highest price its ledger has billed; 0 before its first pod."""
        return max((pod["price_per_hour"] for pod in report["pods"]), default=0.0) * self.settings.pods * self.settings.poll_seconds / 3600

    def _say_what_earlier_launches_spent(self) -> None:
        """The launch line: what the output's earlier launches spent and what is left of
        --max-dollars, which is the output's budget over all its launches."""
        spent = self._ledger_report()["dollars"]
        budget = self.settings.max_dollars
        if spent:
            log.info("this output's earlier launches spent $%.4f of --max-dollars %g: $%.4f left for this one",
                     spent, budget, max(budget - spent, 0.0))

    def _budget_the_next_pod(self) -> None:
        """--max-dollars is the output's, over every launch: a new pod gets its share of
        what is left."""
        report = self._ledger_report()
        spent, budget = report["dollars"], self.settings.max_dollars
        if spent + self._one_look_of_a_pod(report) >= budget:  # the look-ahead the guard would end it by at once
            raise PodLimit(f"spend limit: this output has spent ${spent:.4f} of --max-dollars {budget:g} over its launches "
                           f"(python -m pipeline cost {self.settings.output}): no new pod started", "spend limit")
        self._orchestrator.settings.env["LAUNCH_WATCHDOG_MAX_DOLLARS"] = f"{(budget - spent) / self.settings.pods:.4f}"

    def _limit_reached(self, spend: tuple[float, float, float | None], shard_deadlines: bool = True) -> str | None:
        """A limit's one-line reason (then the pods are ended), or None. Renews the lease;
        after a signal, raises LauncherStopped (its pods are already ended)."""
        self._stop_if_signalled()
        self._lease.renew()
        return self._guard.breach(*spend, shard_deadlines=shard_deadlines)

    def _while_starting(self, pod_id: str | None) -> str | None:
        """At each round of the search for a GPU (``pod_id`` None) and each poll of a pod
        not running yet (provisioning is billed): the live line and the limits. The
        shard deadlines hold while other pods of the run are running."""
        spend = self._run_spend()
        self._see(self._watch.snapshot())
        doing = f"pod {pod_id} starting" if pod_id else "looking for a free GPU"
        self._show(f"{doing}: ${spend[0]:.4f} of ${self.settings.max_dollars:g} (${spend[1]:.3f}/h)"
                   + (f"; ended if not running within {format_duration(self.settings.provisioning_seconds)} of its creation"
                      if pod_id else ""), 0, ("starting", pod_id))
        return self._limit_reached(spend, shard_deadlines=bool(self._live))

    def _stop_if_signalled(self) -> None:
        if self._stopping.is_set():
            raise LauncherStopped(f"{self._end_reason}: ended this run's pod(s) ({', '.join(self._pods) or 'none had started'}); "
                                  "finished shards are kept: rerun the same command to resume")

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on SIGINT/SIGTERM."""
        self._stopping.wait(seconds)

    def _show(self, text: str, percent: int, key: object) -> None:
        """The live line: on the terminal (or the log) and in the web view."""
        self.show_in_web_view(text, percent)
        self._line.show(text, key)

    def _follow(self, live: list[str]) -> list[str]:
        """Report progress until the work is done (returns []) or pods end before it is
        (returns them); past a limit the pods are ended and PodLimit raised."""
        while not self.work_done():
            statuses = {pod_id: self._orchestrator.get_pod_status(pod_id) for pod_id in live}
            self._last_statuses = statuses
            self._stop_if_signalled()  # a pod ended by the signal handler is no pod that ended early
            ended = [pod_id for pod_id, status in statuses.items() if not self._running(status)]
            if ended:
                return [] if self.work_done() else ended
            for status in statuses.values():
                self._orchestrator.record_billed_price(status)
            figures, spend = self._watch.snapshot(), self._run_spend()
            self._see(figures)
            pods = f"pod {live[0]}" if len(live) == 1 else f"{len(live)} pods"
            text = (f"{pods}: {figures.done}/{figures.total} shards done, {figures.tokens_per_second:,.0f} tokens/s, "
                    f"ETA {figures.eta}, ${spend[0]:.4f} of ${self.settings.max_dollars:g} (${spend[1]:.3f}/h)")
            waiting = self._guard.deadline_in()
            if waiting:
                text += f"; {waiting[0]} due within {format_duration(max(waiting[1], 0))}"
            self._show(text, figures.percent, (figures.done, len(live)))
            reason = self._limit_reached(spend)
            if reason:
                log.error("launcher: %s: ending pod(s) %s", reason, ", ".join(live))
                self._end_reason = f"launcher: {reason}"
                raise PodLimit(f"{reason}: ended pod(s) {', '.join(live)} ({figures.done}/{figures.total} shards done)", reason)
            self._end_stalled(live)
            self._pause(self.settings.poll_seconds)
        return []

    def _see(self, figures) -> None:
        self._guard.saw_shards(figures.done)
        self._guard.saw_pod_shards(figures.made_by)

    def _end_stalled(self, live: list[str]) -> None:
        """Of several pods, end those past their own shard deadline while the others
        work (a container that never started, or hangs); the others go on."""
        stalled = self._guard.stalled(live)
        if stalled and len(stalled) == len(live):
            self._end_reason = f"launcher: {stalled[0][1]}"
            raise PodLimit(f"{stalled[0][1]}, and so is every other pod of the run: ended them", stalled[0][1])
        for pod_id, reason in stalled:
            log.error("launcher: %s: ending it; %d other pod(s) go on", reason, len(live) - 1)
            self._orchestrator.terminate_pod(pod_id, reason=f"launcher: {reason}")
            live.remove(pod_id)

    @staticmethod
    def _running(status: dict | None) -> bool:
        return status is not None and status.get("desiredStatus") in ("RUNNING", "CREATED")

    def _end_pods(self, reason: str, again: bool = False) -> None:
        """Terminate every pod of this run, then sweep by name; one failure never stops
        the rest, and signals wait until it is done. Once all have ended, a later call
        does nothing unless ``again``."""
        if not again and self._ended == len(self._pods):
            return  # all ended already
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        errors = []
        try:
            for pod_id in self._pods:
                try:
                    self._orchestrator.terminate_pod(pod_id, reason=reason)
                except Exception as exc:
                    errors.append(exc)
            try:
                self._orchestrator.sweep(reason=f"{reason} (found by the sweep)")
            except Exception as exc:
                errors.append(exc)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        if errors:
            raise errors[0]
        self._ended = len(self._pods)

    def _on_signal(self, number, _frame):
        """End the pods now, wherever the launcher is; it stops at its next look
        (every wait wakes at once), with one line. Nothing is raised from here, so no
        half-done call is cut short."""
        self._end_reason = self._end_reason or f"launcher got {signal.Signals(number).name}"
        self._stopping.set()
        try:
            self._end_pods(self._end_reason)
        except Exception as exc:  # the run's finally tries again
            log.error("ending this run's pods after %s: %s", signal.Signals(number).name, exc)
