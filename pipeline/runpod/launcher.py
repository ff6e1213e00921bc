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
from pipeline.settings import SETTINGS, declared

log = logging.getLogger("luigi-interface")

# Passed to the pod when set on the launcher: bucket endpoints.
PASSED_THROUGH = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def pod_variable(name: str) -> str:
    """The variable of a pod's own credential (``pod_*`` settings): PIPELINE_POD_<NAME>."""
    return declared("pod_" + name.lower()).env


def pod_credentials(environ: Mapping[str, str], schemes: set[str]) -> dict[str, str]:
    """The bucket credentials a pod gets, for the kinds of bucket the run uses only.

    ``PIPELINE_POD_*`` credentials (a key that reaches the run's buckets and nothing
    else, docs/security.md) come first; without them the pod gets the launcher's own,
    with a warning that says what to set. Nothing here is ever logged."""
    env: dict[str, str] = {}
    if "s3" in schemes:
        scoped = bool(environ.get(pod_variable("AWS_ACCESS_KEY_ID")))
        if not scoped and environ.get("AWS_ACCESS_KEY_ID"):
            log.warning("the pod gets the launcher's own AWS keys: set PIPELINE_POD_AWS_ACCESS_KEY_ID and "
                        "PIPELINE_POD_AWS_SECRET_ACCESS_KEY to keys that reach the run's buckets only (docs/security.md)")
        source = {name: pod_variable(name) if scoped else name for name in AWS_KEYS}
        env.update({name: environ[source[name]] for name in AWS_KEYS if environ.get(source[name])})
    if "gs" in schemes:
        key_file = environ.get(pod_variable("GOOGLE_APPLICATION_CREDENTIALS"))
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


class RunpodEmbedAll(RunParameters, luigi.Task):
    """EmbedAll on a Runpod GPU pod; ``--image`` is what ``make image`` pushed."""

    # On a GPU pod the production model is the default, not the offline CPU one.
    model = config.parameter("pod_model")
    image = config.parameter("image")
    gpu_types = config.parameter("gpu_types")
    cloud_type = config.parameter("cloud_type")
    spot = config.parameter("spot")
    spot_relaunches = config.parameter("spot_relaunches", significant=False)
    max_dollars = config.parameter("max_dollars")
    pods = config.parameter("pods", significant=False)
    pods_scheduler_url = config.parameter("pods_scheduler_url", significant=False)
    gpus_per_pod = config.parameter("gpus_per_pod", significant=False)
    # The launcher's waits and deadlines never change which run it is.
    poll_seconds = config.parameter("poll_seconds", significant=False)
    first_shard_seconds = config.parameter("first_shard_seconds", significant=False)
    idle_seconds = config.parameter("idle_seconds", significant=False)
    provisioning_seconds = config.parameter("provisioning_seconds", significant=False)
    capacity_seconds = config.parameter("capacity_seconds", significant=False)

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
        # Every setting declared to travel (pipeline/settings.py): the task's value where it
        # has the parameter, else the launcher's own setting. A new one needs nothing here.
        parameters = {name for name, _ in self.get_params()}
        run = {setting.name: getattr(self, setting.name) if setting.name in parameters else config.setting(setting.name)
               for setting in SETTINGS if setting.to_pods}
        run.update(corpus=corpus, output=self.output_location, model_path=self.model_path or None)
        env = settings_env(run)
        # The watchdog's idle clock starts with the pod, model load and first shard included.
        env.update(Limits(idle_seconds=max(self.idle_seconds, self.first_shard_seconds), max_seconds=self.max_seconds(),
                          max_dollars=self.max_dollars, check_every=float(config.setting("watchdog_check_seconds"))).to_env())
        env.update(PodWorkers(gpus=self.gpus_per_pod, scheduler_url=self.pods_scheduler_url).to_env())
        env.update({k: os.environ[k] for k in PASSED_THROUGH if os.environ.get(k)})
        schemes = {location.split("://", 1)[0] for location in (corpus, self.output_location) if "://" in location}
        env.update(pod_credentials(os.environ, schemes))
        return env

    @staticmethod
    def max_seconds() -> float:
        """The most a pod runs (the watchdog's runtime limit), as the launcher's settings say."""
        return float(config.setting("watchdog_max_seconds"))

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
        limits = RunLimits(self.max_dollars, self.first_shard_seconds, self.idle_seconds, self.max_seconds(), self.poll_seconds)
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

            image = build_and_push(config.setting("registry"))
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
