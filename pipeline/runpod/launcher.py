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
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import luigi

from pipeline import config
from pipeline.config import gpu_type_list

from pipeline import planning, storage, web_view
from pipeline.errors import PipelineError
from pipeline.runpod.launcher_limits import RunLimits
from pipeline.output.ledger import PodLedger
from pipeline.runpod.orchestrator import PodSettings, RunpodOrchestrator
from pipeline.tasks import CorpusManifest, EmbedAll, RunParameters
from pipeline.runpod.pod_env import PodWorkers, settings_env
from pipeline.runpod.pod_run import PodRun, PodRunSettings
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
        return self.clone(EmbedAll, add_new_documents=False, sync=False).complete()

    def pod_env(self) -> dict[str, str]:
        """The pod's environment (``pod_env.py``): the run's settings as its workers read
        them, its watchdog's limits, how it runs its workers, bucket endpoints and the
        pod's own credentials."""
        corpus = self.corpus_location()
        # Every setting of the run its workers take (EmbedAll's that are settings): a new
        # one reaches the pods without a change here.
        run = {name: getattr(self, name) for name, _ in EmbedAll.get_params() if name in config.DEFAULTS}
        run.update(corpus=corpus, output=self.output_location, model_path=self.model_path or None)
        env = settings_env(run)
        own = Limits.from_env(dict(os.environ))  # a run time or check interval set on the launcher goes to its pods
        # The watchdog's idle clock starts with the pod, model load and first shard included.
        env.update(Limits(idle_seconds=max(self.idle_seconds, self.first_shard_seconds), max_seconds=own.max_seconds,
                          max_dollars=self.max_dollars, check_every=own.check_every).to_env())
        env.update(PodWorkers(gpus=self.gpus_per_pod, scheduler_url=self.pods_scheduler_url).to_env())
        env.update({k: os.environ[k] for k in PASSED_THROUGH if os.environ.get(k)})
        schemes = {location.split("://", 1)[0] for location in (corpus, self.output_location) if "://" in location}
        env.update(pod_credentials(os.environ, schemes))
        return env

    def orchestrator(self, image: str, sleep: Callable[[float], None]) -> RunpodOrchestrator:
        settings = PodSettings(
            image=image,
            gpu_types=gpu_type_list(self.gpu_types),
            cloud_type=self.cloud_type,
            spot=self.spot,
            gpu_count=self.gpus_per_pod,
            env=self.pod_env(),
            poll_interval=self.poll_seconds,
            provisioning_timeout=self.provisioning_seconds,
            capacity_timeout=self.capacity_seconds,
        )
        return RunpodOrchestrator(settings, PodLedger(self.output_location), sleep=sleep)

    def pod_run_settings(self) -> PodRunSettings:
        limits = RunLimits(self.max_dollars, self.first_shard_seconds, self.idle_seconds,
                           Limits.from_env(dict(os.environ)).max_seconds, self.poll_seconds)
        return PodRunSettings(self.output_location, self.pods, self.spot, self.spot_relaunches, self.max_dollars,
                              self.poll_seconds, self.provisioning_seconds, limits)

    def run(self):
        planning.check_vector_settings(self)  # a setting every shard would fail on fails here, before a pod is paid for
        if self.pods < 1 or self.gpus_per_pod < 1:
            raise PipelineError(f"--pods {self.pods} --gpus-per-pod {self.gpus_per_pod}: at least one pod of one GPU is needed")
        if self.pods > 1 and not self.pods_scheduler_url:
            raise PipelineError(f"--pods {self.pods} needs --pods-scheduler-url: a luigid all the pods can reach, "
                                "which hands each shard to one of them (docs/runbook.md, 'Several pods')")
        if (self.add_new_documents or self.sync) and self._follow_corpus():
            return
        self._warn_about_what_pods_cannot_reach()
        image = self.image
        if not image:
            # Build and ship this revision's container first (what `make image` does).
            from pipeline.runpod.image import build_and_push

            image = build_and_push(os.environ.get("PIPELINE_REGISTRY", ""))
        # Every pod it starts has ended when it returns or raises.
        PodRun(self.pod_run_settings(), lambda sleep: self.orchestrator(image, sleep), total_shards=self.total_shards,
               work_done=self._work_done, show=lambda text, percent: web_view.show(self, text, percent)).run()

    def _warn_about_what_pods_cannot_reach(self) -> None:
        """A pod runs elsewhere: this machine's disk and loopback are not its own."""
        for flag, location in (("--corpus", self.corpus_location()), ("--output", self.output_location)):
            if not storage.is_remote(location):
                log.warning("%s %s is on this machine's disk, which a Runpod pod cannot read: use a gs:// or s3:// location", flag, location)
        if self.pods_scheduler_url and is_loopback(self.pods_scheduler_url):
            log.warning("--pods-scheduler-url %s is this machine's loopback, which a Runpod pod cannot reach: "
                        "give a luigid address the pods can reach", self.pods_scheduler_url)

    def _follow_corpus(self) -> bool:
        """``--sync`` (or ``--add-new-documents``): the launcher records the corpus's
        changes in the manifest, here, before any pod starts (the pods then run the new
        shards as missing shards, without listing the corpus again). True when there is
        nothing to do, so no pod is started for nothing."""
        run = self.clone(EmbedAll)
        if self.sync:
            run.sync_manifest()
        else:
            run.grow_manifest()
        return self._work_done()
