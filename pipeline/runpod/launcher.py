"""RunpodEmbedAll: run EmbedAll on a Runpod GPU pod and never leave the pod running.

The launcher builds the manifest itself (a listing: cheap), ends this output's pods
that no live launcher follows, starts a pod whose container runs
``python -m pipeline.runpod.watchdog`` (EmbedAll, then the pod ends itself), follows progress
by the shard targets appearing, and terminates the pod when the work is done, when it
fails, at a limit of its own (spend, the first shard's and the next shard's
deadlines, runtime: the watchdog's, for a pod whose watchdog never started), and on
SIGINT/SIGTERM (one line, exit code 30). Its output is EmbedAll's ``_SUCCESS.json``,
so it is complete exactly when the work is.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

import luigi

from pipeline import config

from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.runpod.launcher_limits import RunGuard, RunLimits
from pipeline.runpod.orphans import LauncherLease, clear_the_way
from pipeline.output.ledger import PodLedger, cost_report
from pipeline.runpod.orchestrator import PodLimit, PodSettings, RunpodOrchestrator
from pipeline.core.progress import LiveLine, format_duration
from pipeline.output.status import RunWatch, count_shards
from pipeline.tasks import CorpusManifest, EmbedAll, RunParameters
from pipeline.runpod.pod_env import PodWorkers, settings_env
from pipeline.runpod.watchdog import Limits

log = logging.getLogger("luigi-interface")

# Passed to the pod when set on the launcher: bucket endpoints and retry settings.
PASSED_THROUGH = (
    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT",
    "PIPELINE_STORAGE_RETRIES", "PIPELINE_STORAGE_RETRY_MAX_WAIT",
)
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
POD_PREFIX = "PIPELINE_POD_"


def pod_credentials(environ: Mapping[str, str], schemes: set[str]) -> dict[str, str]:
    """The bucket credentials a pod gets, for the kinds of bucket the run uses only.

    ``PIPELINE_POD_*`` credentials (a key that reaches the run's buckets and nothing
    else, docs/security.md) come first; without them the pod gets the launcher's own,
    with a warning that says what to set. Nothing here is ever logged."""
    env: dict[str, str] = {}
    if "s3" in schemes:
        source = POD_PREFIX if environ.get(POD_PREFIX + "AWS_ACCESS_KEY_ID") else ""
        if not source and environ.get("AWS_ACCESS_KEY_ID"):
            log.warning("the pod gets the launcher's own AWS keys: set PIPELINE_POD_AWS_ACCESS_KEY_ID and "
                        "PIPELINE_POD_AWS_SECRET_ACCESS_KEY to keys that reach the run's buckets only (docs/security.md)")
        env.update({name: environ[source + name] for name in AWS_KEYS if environ.get(source + name)})
    if "gs" in schemes:
        key_file = environ.get(POD_PREFIX + "GOOGLE_APPLICATION_CREDENTIALS")
        if not key_file and environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            key_file = environ["GOOGLE_APPLICATION_CREDENTIALS"]
            log.warning("the pod gets the launcher's own Google key: set PIPELINE_POD_GOOGLE_APPLICATION_CREDENTIALS "
                        "to a service account's key that reaches the run's buckets only (docs/security.md)")
        if key_file:
            if not Path(key_file).is_file():
                raise PipelineError(f"the pod's Google key file {key_file} does not exist")
            env["GOOGLE_CREDENTIALS_JSON"] = Path(key_file).read_text()
    return env


class PodEnded(PipelineError):
    """The pod stopped before the work was done (a crash, a watchdog limit)."""


class LauncherStopped(PipelineError):
    """SIGINT or SIGTERM: the pods are ended, and the task fails with one line."""


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def seconds_setting(description: str) -> config.FloatSetting:
    """A launcher's wait or deadline, in seconds, defaulting to its setting."""
    return config.FloatSetting(significant=False, description=description)


class RunpodEmbedAll(RunParameters, luigi.Task):
    """EmbedAll on a Runpod GPU pod; ``--image`` is what ``make image`` pushed."""

    # On a GPU pod the production model is the default, not the offline CPU one.
    model = config.TextSetting(setting="pod_model", description="model profile on the pod")
    image = config.TextSetting(description="the pod's image; empty: build and push one now")
    gpu_types = config.TextSetting(description="comma-separated, in order of preference")
    cloud_type = config.TextSetting(description="ALL, COMMUNITY or SECURE")
    spot = config.BoolSetting(description="interruptible pods: cheaper; a pod taken back is replaced and the work resumes")
    spot_relaunches = config.IntSetting(significant=False, description="how many taken-back spot pods to replace before giving up")
    max_dollars = config.FloatSetting(
        description="the run's spend limit, shared evenly by its pods; each ends itself past its share")
    pods = config.IntSetting(significant=False, description="pods working at once, each a Luigi worker on --pods-scheduler-url")
    pods_scheduler_url = config.TextSetting(significant=False, description="a luigid every pod can reach (needed for --pods above 1)")
    gpus_per_pod = config.IntSetting(
        significant=False, description="GPUs per pod; the pod runs one worker per GPU, each pinned to its own")
    poll_seconds = seconds_setting("how often the launcher looks at its pods, the shards and the spend")
    first_shard_seconds = seconds_setting("end the pods when no shard comes this long after a pod runs")
    idle_seconds = seconds_setting("end the pods when no new shard comes this long (the pod's watchdog too)")
    provisioning_seconds = seconds_setting("end a pod that is not running this long after its creation")
    capacity_seconds = seconds_setting("how long to look for a free GPU before giving up")

    def requires(self):
        return self.clone(CorpusManifest)

    def output_target(self):
        return self.clone(EmbedAll).output()

    def complete(self):
        return self.clone(EmbedAll).complete()

    def _work_done(self) -> bool:
        """The pods' work is done: their EmbedAll's summary is written (``complete()``
        is never true with ``--add-new-documents``, which asks the launcher to look)."""
        return self.clone(EmbedAll, add_new_documents=False).complete()

    def pod_env(self) -> dict[str, str]:
        """The pod's environment (``pod_env.py``): the run's settings as its workers read
        them, its watchdog's limits, how it runs its workers, bucket endpoints and the
        pod's own credentials."""
        corpus = self.corpus_location()
        env = settings_env({
            "corpus": corpus, "output": self.output_location, "pattern": self.pattern,
            "docs_per_shard": self.docs_per_shard, "model": self.model, "model_path": self.model_path or None,
            "max_tokens": self.max_tokens, "batch_tokens": self.batch_tokens, "device": self.device,
            "precision": self.precision, "readers": self.readers, "skip_duplicates": self.skip_duplicates,
        })
        own = Limits.from_env(dict(os.environ))  # a run time or check interval set on the launcher goes to its pods
        # The watchdog's idle clock starts with the pod, model load and first shard included.
        env.update(Limits(idle_seconds=max(self.idle_seconds, self.first_shard_seconds), max_seconds=own.max_seconds,
                          max_dollars=self.max_dollars, check_every=own.check_every).to_env())
        env.update(PodWorkers(gpus=self.gpus_per_pod, scheduler_url=self.pods_scheduler_url).to_env())
        env.update({k: os.environ[k] for k in PASSED_THROUGH if os.environ.get(k)})
        schemes = {location.split("://", 1)[0] for location in (corpus, self.output_location) if "://" in location}
        env.update(pod_credentials(os.environ, schemes))
        return env

    def orchestrator(self, image: str) -> RunpodOrchestrator:
        settings = PodSettings(
            image=image,
            gpu_types=tuple(g.strip() for g in self.gpu_types.split(",") if g.strip()),
            cloud_type=self.cloud_type,
            spot=self.spot,
            gpu_count=self.gpus_per_pod,
            env=self.pod_env(),
            poll_interval=self.poll_seconds,
            provisioning_timeout=self.provisioning_seconds,
            capacity_timeout=self.capacity_seconds,
        )
        return RunpodOrchestrator(settings, PodLedger(self.output_location), sleep=self._pause)

    def limits(self) -> RunLimits:
        return RunLimits(self.max_dollars, self.first_shard_seconds, self.idle_seconds,
                         Limits.from_env(dict(os.environ)).max_seconds, self.poll_seconds)

    def run(self):
        if self.pods < 1 or self.gpus_per_pod < 1:
            raise PipelineError(f"--pods {self.pods} --gpus-per-pod {self.gpus_per_pod}: at least one pod of one GPU is needed")
        if self.pods > 1 and not self.pods_scheduler_url:
            raise PipelineError(f"--pods {self.pods} needs --pods-scheduler-url: a luigid all the pods can reach, "
                                "which hands each shard to one of them (docs/runbook.md, 'Several pods')")
        if self.add_new_documents and self._grow_manifest():
            return
        self._warn_about_what_pods_cannot_reach()
        image = self.image
        if not image:
            # Build and ship this revision's container first (what `make image` does).
            from pipeline.runpod.image import build_and_push

            image = build_and_push(os.environ.get("PIPELINE_REGISTRY", ""))
        self._stopping = threading.Event()  # set by SIGINT/SIGTERM: every wait ends at once
        self._orchestrator = self.orchestrator(image)
        self._pods: list[str] = []  # every pod this run started
        self._live: list[str] = []  # those it follows now
        self._ended: int | None = None  # how many of them _end_pods has ended
        self._end_reason = ""
        self._guard = RunGuard(self.limits(), clock=self._orchestrator.clock)
        self._lease = LauncherLease(self.output_location, self._orchestrator.run_id, self.poll_seconds)
        self._line = LiveLine(log)
        self._watch = RunWatch(self.output_location, self.total_shards())  # one for the run: rates and who made what
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._lease.renew(force=True)
            clear_the_way(self._orchestrator, self.output_location)
            self._follow_until_done()
        except PodLimit as exc:
            self._end_reason = self._end_reason or f"launcher: {exc.reason}"
            raise PodLimit(f"{exc}; rerun to resume (finished shards are kept)") from None
        finally:
            failing = sys.exc_info()[1] is not None
            try:
                self._end_pods(self._end_reason or ("launcher finished" if self._work_done() else "launcher stopped"), again=True)
                self._lease.release()
            except Exception as exc:
                if not failing:
                    raise
                # The run's own error is the one to show; this one is logged, and the
                # failure handler tries to end the pods once more.
                log.error("ending this run's pods: %s", exc)
            finally:
                self._line.close()
                for number, handler in previous.items():
                    signal.signal(number, handler)

    def _follow_until_done(self) -> None:
        """Launch the pods, follow them, replace spot pods taken back; returns when the
        work is done and raises when it cannot be."""
        live = self._live
        for _ in range(self.pods):
            live.append(self._launch())
        replaced = 0
        while True:
            ended = self._follow(live)
            if not ended:
                return
            live[:] = [pod_id for pod_id in live if pod_id not in ended]
            for pod_id in ended:
                taken_back = self.spot and not self._ended_by_its_watchdog(pod_id)
                self._orchestrator.terminate_pod(pod_id, reason="spot pod taken back" if taken_back else "ended before the run was done")
                if taken_back and replaced < self.spot_relaunches:
                    # A new pod resumes from the published shards.
                    replaced += 1
                    log.warning("pod %s, a spot pod, was taken back; a new one takes over (%d of %d)", pod_id, replaced, self.spot_relaunches)
                    live.append(self._launch())
                elif live:
                    log.warning("pod %s ended before the run was done; %d other pod(s) go on with its shards", pod_id, len(live))
            if not live:
                done, total = count_shards(self.output_location), self.total_shards()
                raise PodEnded(f"pod(s) {', '.join(ended)} ended before the work was done ({done}/{total} shards); rerun to resume")

    def _warn_about_what_pods_cannot_reach(self) -> None:
        """A pod runs elsewhere: this machine's disk and loopback are not its own."""
        for flag, location in (("--corpus", self.corpus_location()), ("--output", self.output_location)):
            if not storage.is_remote(location):
                log.warning("%s %s is on this machine's disk, which a Runpod pod cannot read: use a gs:// or s3:// location", flag, location)
        if self.pods_scheduler_url and is_loopback(self.pods_scheduler_url):
            log.warning("--pods-scheduler-url %s is this machine's loopback, which a Runpod pod cannot reach: "
                        "give a luigid address the pods can reach", self.pods_scheduler_url)

    def _grow_manifest(self) -> bool:
        """``--add-new-documents``: the launcher appends the corpus's new documents as
        new shards (the pods then run them as missing shards). True when there is nothing
        to do, so no pod is started for nothing."""
        self.clone(EmbedAll).grow_manifest()
        return self._work_done()

    def _launch(self) -> str:
        self._stop_if_signalled()
        self._budget_the_next_pod()
        pod_id = self._orchestrator.start_pod(limit=lambda: self._while_starting(None))
        self._pods.append(pod_id)
        self._stop_if_signalled()  # a create in flight when the signal came: the run's finally ends it
        self._orchestrator.wait_until_running(pod_id, limit=lambda: self._while_starting(pod_id))
        self._guard.pod_running(pod_id)
        return pod_id

    def _ended_by_its_watchdog(self, pod_id: str) -> bool:
        """Whether the pod ended itself (its record says why): work done or a limit,
        not a spot pod taken back."""
        try:
            return str(PodLedger(self.output_location).get(pod_id).get("end_reason") or "").startswith("watchdog:")
        except FileNotFoundError:
            return False

    def _run_spend(self) -> tuple[float, float, float | None]:
        """(dollars this run has spent, dollars per hour its running pods cost, when its
        oldest running pod was created), from the ledger: each pod's own billed price."""
        report = cost_report(self.output_location, self._orchestrator.clock())
        run = next((r for r in report["runs"] if r["run_id"] == self._orchestrator.run_id), None)
        return (run["dollars"], run["dollars_per_hour"], run["oldest_running_epoch"]) if run else (0.0, 0.0, None)

    def _budget_the_next_pod(self) -> None:
        """--max-dollars is for the whole run: a new pod gets its share of what is left."""
        spent, _, _ = self._run_spend()
        if spent >= self.max_dollars:
            raise PodEnded(f"this run has spent ${spent:.2f} of its ${self.max_dollars:.2f}: no new pod; rerun with a larger --max-dollars to resume")
        self._orchestrator.settings.env["PIPELINE_WATCHDOG_MAX_DOLLARS"] = f"{(self.max_dollars - spent) / self.pods:.4f}"

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
        self._show(f"{doing}: ${spend[0]:.4f} of ${self.max_dollars:g} (${spend[1]:.3f}/h)"
                   + (f"; ended if not running within {format_duration(self.provisioning_seconds)} of its creation" if pod_id else ""),
                   0, ("starting", pod_id))
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
        self.set_status_message(text)
        self.set_progress_percentage(percent)
        self._line.show(text, key)

    def _follow(self, live: list[str]) -> list[str]:
        """Report progress until the work is done (returns []) or pods end before it is
        (returns them); past a limit the pods are ended and PodLimit raised."""
        while not self._work_done():
            statuses = {pod_id: self._orchestrator.get_pod_status(pod_id) for pod_id in live}
            self._stop_if_signalled()  # a pod ended by the signal handler is no pod that ended early
            ended = [pod_id for pod_id, status in statuses.items() if not self._running(status)]
            if ended:
                return [] if self._work_done() else ended
            for status in statuses.values():
                self._orchestrator.record_billed_price(status)
            figures, spend = self._watch.snapshot(), self._run_spend()
            self._see(figures)
            pods = f"pod {live[0]}" if len(live) == 1 else f"{len(live)} pods"
            text = (f"{pods}: {figures.done}/{figures.total} shards done, {figures.tokens_per_second:,.0f} tokens/s, "
                    f"ETA {figures.eta}, ${spend[0]:.4f} of ${self.max_dollars:g} (${spend[1]:.3f}/h)")
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
            self._pause(self.poll_seconds)
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
        does nothing unless ``again`` (run's last word: a create in flight during a
        signal may have made a pod since)."""
        orchestrator = getattr(self, "_orchestrator", None)
        if orchestrator is None or (not again and getattr(self, "_ended", None) == len(self._pods)):
            return  # nothing started, or all ended already
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        errors = []
        try:
            for pod_id in getattr(self, "_pods", []):
                try:
                    orchestrator.terminate_pod(pod_id, reason=reason)
                except Exception as exc:
                    errors.append(exc)
            try:
                orchestrator.sweep(reason=f"{reason} (found by the sweep)")
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

    def on_success(self):
        self._end_pods("done")

    def on_failure(self, exception):
        explanation = super().on_failure(exception)
        try:
            self._end_pods(f"failed: {exception}")
        except Exception as exc:  # the task still fails with its explanation, not a crashed worker
            log.error("ending this run's pods failed: %s", exc)
            explanation += f"\nEnding this run's pods failed too ({exc}): check the Runpod console\n"
        return explanation

