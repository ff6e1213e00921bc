"""RunpodEmbedAll: run EmbedAll on a Runpod GPU pod and never leave the pod running.

The launcher builds the manifest itself (a listing: cheap), starts a pod whose
container runs ``python -m pipeline.watchdog`` (EmbedAll, then the pod ends itself),
follows progress by the shard targets appearing, and terminates the pod when the work
is done, when it fails, and on SIGINT/SIGTERM. Its output is EmbedAll's
``_SUCCESS.json``, so it is complete exactly when the work is.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Mapping

import luigi

from . import config
from .errors import PipelineError
from .pods import PodLedger, PodSettings, RunpodOrchestrator, cost_report
from .status import RunWatch, count_shards
from .tasks import CorpusManifest, EmbedAll, RunParameters

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


class PodEnded(Exception):
    """The pod stopped before the work was done (a crash, a watchdog limit)."""


class RunpodEmbedAll(RunParameters, luigi.Task):
    """EmbedAll on a Runpod GPU pod; ``--image`` is what ``make image`` pushed."""

    # On a GPU pod the production model is the default, not the offline CPU one.
    model = luigi.Parameter(default=config.setting("pod_model"), description="model profile on the pod")
    image = luigi.Parameter(default=config.setting("image"), description="the pod's image; empty: build and push one now")
    gpu_types = luigi.Parameter(default=config.setting("gpu_types"), description="comma-separated, in order of preference")
    cloud_type = luigi.Parameter(default=config.setting("cloud_type"), description="ALL, COMMUNITY or SECURE")
    spot = luigi.BoolParameter(default=config.setting("spot").lower() in ("1", "true", "yes"),
                               description="interruptible pods: cheaper; a pod taken back is replaced and the work resumes")
    spot_relaunches = luigi.IntParameter(default=int(config.setting("spot_relaunches")), significant=False,
                                         description="how many taken-back spot pods to replace before giving up")
    max_dollars = luigi.FloatParameter(default=float(config.setting("max_dollars")),
                                       description="the run's spend limit, shared evenly by its pods; each ends itself past its share")
    pods = luigi.IntParameter(default=int(config.setting("pods")), significant=False,
                              description="pods working at once, each a Luigi worker on --pods-scheduler-url")
    pods_scheduler_url = luigi.Parameter(default=config.setting("pods_scheduler_url"), significant=False,
                                    description="a luigid every pod can reach (needed for --pods above 1)")
    gpus_per_pod = luigi.IntParameter(default=int(config.setting("gpus_per_pod")), significant=False,
                                      description="GPUs per pod; the pod runs one worker per GPU, each pinned to its own")
    poll_seconds = luigi.FloatParameter(default=float(config.setting("poll_seconds")), significant=False)

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
        env = {
            "PIPELINE_CORPUS": self.corpus_location(),
            "PIPELINE_OUTPUT": self.output_location,
            "PIPELINE_PATTERN": self.pattern,
            "PIPELINE_DOCS_PER_SHARD": str(self.docs_per_shard),
            "PIPELINE_MODEL": self.model,
            "PIPELINE_MAX_TOKENS": str(self.max_tokens),
            "PIPELINE_BATCH_TOKENS": str(self.batch_tokens),
            "PIPELINE_DEVICE": self.device,
            "PIPELINE_PRECISION": self.precision,
            "PIPELINE_READERS": str(self.readers),
            "PIPELINE_SKIP_DUPLICATES": str(self.skip_duplicates).lower(),
            "PIPELINE_WATCHDOG_MAX_DOLLARS": str(self.max_dollars),
            "PIPELINE_GPUS": str(self.gpus_per_pod),
        }
        if self.model_path:
            env["PIPELINE_MODEL_PATH"] = self.model_path
        if self.pods_scheduler_url:
            env["PIPELINE_SCHEDULER_URL"] = self.pods_scheduler_url
        env.update({k: os.environ[k] for k in PASSED_THROUGH if os.environ.get(k)})
        for name in ("PIPELINE_WATCHDOG_IDLE_SECONDS", "PIPELINE_WATCHDOG_MAX_SECONDS", "PIPELINE_WATCHDOG_CHECK_SECONDS"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        schemes = {location.split("://", 1)[0] for location in (env["PIPELINE_CORPUS"], self.output_location) if "://" in location}
        env.update(pod_credentials(os.environ, schemes))
        return env

    def orchestrator(self) -> RunpodOrchestrator:
        settings = PodSettings(
            image=self.image,
            gpu_types=tuple(g.strip() for g in self.gpu_types.split(",") if g.strip()),
            cloud_type=self.cloud_type,
            spot=self.spot,
            gpu_count=self.gpus_per_pod,
            env=self.pod_env(),
            poll_interval=self.poll_seconds,
        )
        return RunpodOrchestrator(settings, PodLedger(self.output_location))

    def run(self):
        if self.pods < 1 or self.gpus_per_pod < 1:
            raise PipelineError(f"--pods {self.pods} --gpus-per-pod {self.gpus_per_pod}: at least one pod of one GPU is needed")
        if self.pods > 1 and not self.pods_scheduler_url:
            raise PipelineError(f"--pods {self.pods} needs --pods-scheduler-url: a luigid all the pods can reach, "
                                "which hands each shard to one of them (docs/runbook.md, 'Several pods')")
        if self.add_new_documents and self._grow_manifest():
            return
        if not self.image:
            # Build and ship this revision's container first (what `make image` does).
            from .image import build_and_push

            self.image = build_and_push(os.environ.get("PIPELINE_REGISTRY", ""))
        self._orchestrator = self.orchestrator()
        self._pods: list[str] = []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            live = [self._launch() for _ in range(self.pods)]
            replaced = 0
            while True:
                ended = self._follow(live)
                if not ended:
                    break
                live = [pod_id for pod_id in live if pod_id not in ended]
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
        finally:
            try:
                self._end_pods("launcher finished" if self._work_done() else "launcher stopped")
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

    def _grow_manifest(self) -> bool:
        """``--add-new-documents``: the launcher appends the corpus's new documents as
        new shards (the pods then run them as missing shards). True when there is nothing
        to do, so no pod is started for nothing."""
        self.clone(EmbedAll).grow_manifest()
        return self._work_done()

    def _launch(self) -> str:
        self._budget_the_next_pod()
        pod_id = self._orchestrator.start_pod()
        self._pods.append(pod_id)
        self._orchestrator.wait_until_running(pod_id)
        return pod_id

    def _ended_by_its_watchdog(self, pod_id: str) -> bool:
        """Whether the pod ended itself (its record says why): work done or a limit,
        not a spot pod taken back."""
        try:
            return str(PodLedger(self.output_location).get(pod_id).get("end_reason") or "").startswith("watchdog:")
        except FileNotFoundError:
            return False

    def _budget_the_next_pod(self) -> None:
        """--max-dollars is for the whole run: a new pod gets its share of what is left."""
        report = cost_report(self.output_location)
        spent = next((r["dollars"] for r in report["runs"] if r["run_id"] == self._orchestrator.run_id), 0.0)
        if spent >= self.max_dollars:
            raise PodEnded(f"this run has spent ${spent:.2f} of its ${self.max_dollars:.2f}: no new pod; rerun with a larger --max-dollars to resume")
        self._orchestrator.settings.env["PIPELINE_WATCHDOG_MAX_DOLLARS"] = f"{(self.max_dollars - spent) / self.pods:.4f}"

    def _follow(self, live: list[str]) -> list[str]:
        """Report progress until the work is done (returns []) or pods end before it
        is (returns them)."""
        watch = RunWatch(self.output_location, self.total_shards())
        while not self._work_done():
            message, percent = watch.figures()
            pods = f"pod {live[0]}" if len(live) == 1 else f"{len(live)} pods"
            self.set_status_message(f"{pods}: {message}")
            self.set_progress_percentage(percent)
            ended = [pod_id for pod_id in live if not self._running(pod_id)]
            if ended:
                return [] if self._work_done() else ended
            time.sleep(self.poll_seconds)
        return []

    def _running(self, pod_id: str) -> bool:
        status = self._orchestrator.get_pod_status(pod_id)
        return status is not None and status.get("desiredStatus") in ("RUNNING", "CREATED")

    def _end_pods(self, reason: str) -> None:
        """Terminate every pod of this run, then sweep by name; one failure never stops
        the rest, and signals wait until it is done."""
        orchestrator = getattr(self, "_orchestrator", None)
        if orchestrator is None:
            return
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

    def _on_signal(self, number, _frame):
        self._end_pods(f"launcher got {signal.Signals(number).name}")
        raise KeyboardInterrupt(f"launcher got {signal.Signals(number).name}")

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

