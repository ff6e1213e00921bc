"""Runpod pods: start (with GPU fallback), watch, stop, terminate, sweep, and a ledger.

Built on the runpod SDK, which has no retries of its own: a 5xx or 429 without a
GraphQL error comes back as a body the SDK then fails to read (``KeyError: 'data'``
or a JSON decode error), and one with a GraphQL error ("internal error") as a
``QueryError`` like any refused request. ``sdk.StatusAwareRequests`` lets the SDK see the
HTTP status (``sdk.py``), so every 5xx and 429 is retried with backoff, whatever its body says. A pod is written to
the ledger the moment its creation returns, and a creation that failed in transit is
looked up by its unique name before it is tried again, so no pod is ever orphaned.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline.config import DEFAULTS, gpu_type_list
from pipeline.settings import default
from pipeline.output.ledger import PodLedger, ledger_record
from pipeline.runpod.pod_env import PodIdentity, encode_env
from pipeline.runpod.sdk import describe, import_runpod, is_transient, let_the_sdk_see_http_status, spot_pod_mutation
from pipeline.errors import PipelineError, backoff

log = logging.getLogger("luigi-interface")

DEFAULT_GPU_TYPES = gpu_type_list(DEFAULTS["gpu_types"])
POD_NAME_PREFIX = "embedding-pipeline-"
_NO_CAPACITY = re.compile(r"no longer any instances available|not enough free gpus|no available", re.I)


class PodError(PipelineError):
    """A pod could not be started, watched or ended; the message says which and why."""


class NoCapacity(PodError):
    """No GPU of any preferred type was free for the whole capacity wait."""


class ApiKeyRefused(PodError):
    """The Runpod API refused the key: nothing can have been created with it."""


class NotOffered(PodError):
    """This GPU type cannot be rented this way (no spot price in this cloud, or no such type)."""


class PodStuck(PodError):
    """A pod did not start running before the provisioning deadline (it was terminated)."""


class PodLimit(PodError):
    """The launcher ended a pod at one of the run's limits (spend, deadlines);
    ``reason`` is the limit's one line."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@dataclass
class PodSettings:
    image: str
    gpu_types: tuple[str, ...] = DEFAULT_GPU_TYPES  # in order of preference
    cloud_type: str = default("cloud_type")  # ALL, COMMUNITY or SECURE
    spot: bool = default("spot")  # interruptible: cheaper, may be stopped at any time
    gpu_count: int = default("gpus_per_pod")
    container_disk_gb: int = 40
    env: dict[str, str] = field(default_factory=dict)
    docker_args: str = ""
    provisioning_timeout: float = default("provisioning_seconds")  # image pulls of big images take 10+ minutes
    capacity_timeout: float = default("capacity_seconds")  # how long to keep looking for a free GPU
    capacity_retry_wait: float = 30  # first wait between rounds of the GPU list; doubles
    poll_interval: float = 10
    api_attempts: int = 6
    api_max_wait: float = 30


class RunpodOrchestrator:
    """Start, watch and end pods for one run; every pod it starts is in the ledger."""

    def __init__(
        self,
        settings: PodSettings,
        ledger: PodLedger | str | os.PathLike,
        api_key: Optional[str] = None,
        run_id: Optional[str] = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        runpod = import_runpod()
        key = api_key or os.environ.get("RUNPOD_API_KEY")
        if not key:
            raise PipelineError("RUNPOD_API_KEY is not set: put your Runpod API key in the environment or in .env")
        runpod.api_key = key  # the SDK does not read it from the environment itself
        let_the_sdk_see_http_status()
        self.runpod = runpod
        self.settings = settings
        self.ledger = PodLedger(os.fspath(ledger)) if isinstance(ledger, (str, os.PathLike)) else ledger  # an output's
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.clock = clock
        self.sleep = sleep
        self._pods_started = 0
        # Creates in flight, by pod name: what the ledger needs if the pod must be
        # swept before its record was written (a signal between create and record).
        self._creating: dict[str, tuple[str, float, float]] = {}
        self._terminated: dict[str, float] = {}  # confirmed gone (when): not asked or logged again

    # -- calls ------------------------------------------------------------------------

    def _call(self, action: str, function: Callable, *args, **kwargs):
        def on_retry(exc: BaseException, attempt: int, wait: float) -> None:
            log.warning("runpod: %s: %s; retry %d in %.1fs", action, describe(exc), attempt, wait)

        retryer = backoff(is_transient, self.settings.api_attempts, self.settings.api_max_wait, on_retry, self.sleep)
        try:
            return retryer(function, *args, **kwargs)
        except PipelineError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "AuthenticationError":
                raise ApiKeyRefused(f"runpod: {action}: the API key was refused ({exc})") from exc
            raise PodError(f"runpod: {action}: {describe(exc)}") from exc

    def _gpu_listing(self, gpu_type: str) -> dict:
        """The API's listing of one GPU type; a type it does not know is not offered (a
        typo in --gpu-types, a type retired), so the next one is tried."""
        try:
            return self.runpod.get_gpu(gpu_type)
        except ValueError as exc:
            if "No GPU found" not in str(exc):
                raise
            raise NotOffered(f"runpod: {gpu_type!r} is no GPU type the API knows (python -m pipeline estimate "
                             "lists the known ones)") from exc

    def gpu_price(self, gpu_type: str) -> float:
        """The hourly price of the pod's GPUs of this type in this cloud, read at run
        time; for a spot pod, the bid (the listed spot price, at least the minimum bid)."""
        gpu = self._call(f"reading the price of {gpu_type}", self._gpu_listing, gpu_type)
        kind = "SpotPrice" if self.settings.spot else "Price"
        prices = {"COMMUNITY": gpu.get(f"community{kind}"), "SECURE": gpu.get(f"secure{kind}")}
        if self.settings.cloud_type != "ALL":
            prices = {self.settings.cloud_type: prices[self.settings.cloud_type]}
        known = [p for p in prices.values() if p]
        per_gpu = min(known) if known else 0.0
        if not per_gpu and not self.settings.spot:
            log.warning("runpod: the API lists no price for %s in cloud %s: the pod's own billed price (costPerHr) "
                        "is read as soon as it exists", gpu_type, self.settings.cloud_type)
        if self.settings.spot:
            if not per_gpu:
                raise NotOffered(f"runpod: no spot price listed for {gpu_type} in cloud {self.settings.cloud_type}")
            per_gpu = max(per_gpu, (gpu.get("lowestPrice") or {}).get("minimumBidPrice") or 0.0)
        return per_gpu * self.settings.gpu_count

    # -- lifecycle --------------------------------------------------------------------

    def start_pod(self, gpu_type: Optional[str] = None, limit: Optional[Callable[[], Optional[str]]] = None) -> str:
        """Start one pod, trying the preferred GPU types in order, in rounds, until one
        has capacity or ``capacity_timeout`` passes. Returns the pod id. ``limit()`` is
        asked between rounds: a reason it returns raises PodLimit."""
        types = list((gpu_type,) if gpu_type else self.settings.gpu_types)
        began = self.clock()
        deadline = began + self.settings.capacity_timeout
        wait = self.settings.capacity_retry_wait
        while True:
            for gpu in list(types):
                try:
                    pod_id = self._try_create(gpu)
                except NotOffered as exc:
                    log.warning("%s; skipping it", exc)
                    types.remove(gpu)
                    if not types:
                        raise
                    continue
                if pod_id:
                    return pod_id
            left = deadline - self.clock()
            if left <= 0:
                raise NoCapacity(f"runpod: no capacity for {', '.join(types)} in cloud {self.settings.cloud_type} "
                                 f"in {self.clock() - began:.0f}s of looking (--capacity-seconds {self.settings.capacity_timeout:g})")
            self._check(limit)
            log.warning("runpod: no capacity for %s; trying again in %.0fs", ", ".join(types), min(wait, left))
            self._wait_watching(min(wait, left), limit)  # the last round is at the deadline, not before it
            wait = min(wait * 2, 300)

    def _wait_watching(self, seconds: float, limit: Optional[Callable[[], Optional[str]]]) -> None:
        """Wait between two rounds of the search for a GPU, asking ``limit()`` at least every
        ``poll_interval``: the run's running pods stay held to its budget and deadlines while
        another pod is looked for (rounds are up to 5 minutes apart), and a signal stops the
        search before another pod is created."""
        end = self.clock() + seconds
        while (left := end - self.clock()) > 0:
            self.sleep(min(left, self.settings.poll_interval))
            self._check(limit)

    @staticmethod
    def _check(limit: Optional[Callable[[], Optional[str]]]) -> None:
        reason = limit() if limit else None
        if reason:
            raise PodLimit(f"runpod: {reason}: stopped looking for a free GPU", reason)

    def _try_create(self, gpu_type: str) -> Optional[str]:
        price = self.gpu_price(gpu_type)
        self._pods_started += 1
        name = f"{POD_NAME_PREFIX}{self.run_id}-{self._pods_started}"
        s = self.settings
        arguments = dict(
            name=name, image_name=s.image, gpu_type_id=gpu_type, cloud_type=s.cloud_type, gpu_count=s.gpu_count,
            container_disk_in_gb=s.container_disk_gb, docker_args=s.docker_args,
            # The watchdog's budget counts from creation (provisioning is billed) at this
            # price, and it can write the pod's ledger record if the launcher dies first.
            env=encode_env({**s.env, **self._pod_identity(name, gpu_type, price)}),
            support_public_ip=False, start_ssh=False,
        )
        self._creating[name] = (gpu_type, price, self.clock())  # billing starts no earlier
        for attempt in range(1, s.api_attempts + 1):
            began = self.clock()
            try:
                pod = self._create(arguments, price / s.gpu_count)
                self._creating[name] = (gpu_type, price, began)  # not the attempts that made nothing
                break
            except Exception as exc:
                if "QueryError" in type(exc).__name__ and _NO_CAPACITY.search(str(exc)):
                    log.info("runpod: no %s free: %s", gpu_type, exc)
                    return None
                if not is_transient(exc) or attempt == s.api_attempts:
                    if type(exc).__name__ == "AuthenticationError":
                        raise PodError(f"runpod: creating a pod: the API key was refused ({exc})") from exc
                    self._end_if_created(name)  # the server may have made it all the same
                    raise PodError(f"runpod: creating a {gpu_type} pod: {describe(exc)}") from exc
                # The pod may exist although the answer was lost: look before trying again.
                self.sleep(min(s.api_max_wait, 2**attempt * s.api_max_wait / 32))
                pod = self._find_by_name(name)
                if pod:
                    log.warning("runpod: creating %s failed in transit but the pod exists; keeping it", name)
                    self._creating[name] = (gpu_type, price, began)  # made during the attempt whose answer was lost
                    break
                log.warning("runpod: creating a %s pod: %s; retry %d", gpu_type, describe(exc), attempt)
        try:
            # Unless a sweep (a signal during the create) has written it, and closed it, already.
            self._record_if_unrecorded(pod["id"], name)
        except Exception:
            # A pod nobody has written down is a pod nobody will stop: end it now.
            self._call(f"terminating unrecorded pod {pod['id']}", self.runpod.terminate_pod, pod["id"])
            raise
        self._creating.pop(name, None)
        log.info("runpod: started pod %s (%s, $%.3f/h listed)", pod["id"], gpu_type, price)
        # Its own billed price at once: a pod that never runs is billed from now too.
        self.record_billed_price(self.get_pod_status(pod["id"]) or {"id": pod["id"]})
        return pod["id"]

    def _create(self, arguments: dict[str, Any], price_per_gpu: float) -> dict:
        if not self.settings.spot:
            return self.runpod.create_pod(**arguments)
        # The SDK has no call for a spot pod; its own query runner sends ours.
        from runpod.api.graphql import run_graphql_query

        answer = run_graphql_query(spot_pod_mutation(**arguments, bid_per_gpu=price_per_gpu))
        return answer["data"]["podRentInterruptable"]

    def _record_for(self, pod_id: str, name: str) -> dict[str, Any]:
        gpu_type, price, started = self._creating[name]
        s = self.settings
        return ledger_record(pod_id, name, self.run_id, gpu_type, s.gpu_count, s.cloud_type, price, s.image, started)

    def _pod_identity(self, name: str, gpu_type: str, price: float) -> dict[str, str]:
        return PodIdentity(name=name, run_id=self.run_id, gpu_type=gpu_type, cloud_type=self.settings.cloud_type,
                           image=self.settings.image, created_at=self.clock(), price_per_hour=price).to_env()

    def _end_if_created(self, name: str) -> None:
        try:
            pod = self._find_by_name(name)
        except PodError:
            return
        if pod:
            log.warning("runpod: a failed create left pod %s; terminating it", pod["id"])
            self._record_if_unrecorded(pod["id"], name)
            self.terminate_pod(pod["id"], reason="create failed")

    def _record_if_unrecorded(self, pod_id: str, name: str) -> None:
        """Write down a pod whose create never came back to us, so that terminating it
        records when it ended and what it cost."""
        try:
            self.ledger.get(pod_id)
        except FileNotFoundError:
            self.ledger.record(self._record_for(pod_id, name))

    def _find_by_name(self, name: str) -> Optional[dict]:
        return next((p for p in self.list_pods() if p.get("name") == name), None)

    def get_pod_status(self, pod_id: str) -> Optional[dict]:
        """The pod as the API shows it, or None once it is gone (terminated)."""
        return self._call(f"reading pod {pod_id}", self.runpod.get_pod, pod_id)

    def wait_until_running(self, pod_id: str, limit: Optional[Callable[[], Optional[str]]] = None) -> dict:
        """Poll until the pod's container runs; past the provisioning deadline (a stuck
        image pull, a broken host) the pod is terminated and PodStuck raised. ``limit()``
        is asked at every poll (provisioning is billed): a reason it returns ends the pod
        and raises PodLimit."""
        deadline = self.clock() + self.settings.provisioning_timeout
        while True:
            pod = self.get_pod_status(pod_id)
            if pod is None:
                raise PodError(f"runpod: pod {pod_id} disappeared while starting")
            self.record_billed_price(pod)
            if pod.get("runtime"):
                return pod
            if self.clock() >= deadline:
                self.terminate_pod(pod_id, reason="stuck provisioning")
                raise PodStuck(f"runpod: pod {pod_id} was not running after {self.settings.provisioning_timeout:.0f}s; terminated it")
            reason = limit() if limit else None
            if reason:
                self.terminate_pod(pod_id, reason=f"launcher: {reason}")
                raise PodLimit(f"runpod: {reason}: ended pod {pod_id} while it was starting", reason)
            self.sleep(self.settings.poll_interval)

    def record_billed_price(self, pod: dict) -> None:
        """The ledger starts with the listed price; the pod's own ``costPerHr`` is what
        is billed (with cloud ALL it may be the secure price, not the lower one; with no
        listed price, the only one). A pod with no price at all cannot be held to a
        budget, so it is ended."""
        actual = float(pod.get("costPerHr") or 0)
        record = self.ledger.get(pod["id"])
        if actual and abs(actual - record["price_per_hour"]) > 1e-9:
            log.info("runpod: pod %s is billed $%.3f/h (listed $%.3f/h)", pod["id"], actual, record["price_per_hour"])
            record["price_per_hour"] = actual
            self.ledger.record(record)
        elif not actual and not record["price_per_hour"]:
            record["price_unknown"] = True  # billed all the same: never shown as $0 (python -m pipeline cost)
            self.ledger.record(record)
            self.terminate_pod(pod["id"], reason="no price known")
            raise PodError(f"runpod: pod {pod['id']} ({record['gpu_type']}) has no price: none is listed and the pod shows "
                           "no costPerHr, so its cost and --max-dollars could not be counted; ended it")

    def stop_pod(self, pod_id: str) -> None:
        """Stop without terminating: the pod's disk is kept and still billed. Teardown
        uses terminate_pod; this exists for the seed's contract."""
        self._call(f"stopping pod {pod_id}", self.runpod.stop_pod, pod_id)

    def terminate_pod(self, pod_id: str, reason: str = "done") -> None:
        """End the pod and its billing, confirmed: the SDK's terminate_pod returns
        normally even when the API answered 5xx or 429, so only a pod the API no longer
        shows counts as ended, and then its ledger record is closed. Safe to call twice:
        a pod already confirmed gone is neither asked about nor logged again."""
        if pod_id in self._terminated:
            self.close_record(pod_id, reason, self._terminated[pod_id])  # a create answered after the sweep may have reopened it
            return
        for attempt in range(1, self.settings.api_attempts + 1):
            try:
                self._call(f"terminating pod {pod_id}", self.runpod.terminate_pod, pod_id)
            except PodError:
                pass  # an already-gone pod is an error to the API: its absence below decides
            asked = self.clock()  # billing ends with the terminate, not with a confirmation retried later
            try:
                gone = self.get_pod_status(pod_id) is None
            except PodError as exc:  # the API cannot say yet: ask again
                log.warning("runpod: could not confirm pod %s ended (%s)", pod_id, exc)
                gone = False
            if gone:
                break
            log.warning("runpod: pod %s still exists after terminate; attempt %d", pod_id, attempt)
            self.sleep(min(self.settings.api_max_wait, 2**attempt * self.settings.api_max_wait / 32))
        else:
            raise PodError(f"runpod: pod {pod_id} is still there after {self.settings.api_attempts} terminations: "
                           f"end it in the Runpod console, or with `python -m pipeline pods sweep OUTPUT`")
        self._terminated[pod_id] = asked
        self.close_record(pod_id, reason, asked)
        log.info("runpod: terminated pod %s (%s)", pod_id, reason)

    def close_record(self, pod_id: str, reason: str, ended: Optional[float] = None) -> None:
        """Mark a pod the API no longer shows as ended (at ``ended``, else now) in the
        ledger, if it is there and not already closed (by its watchdog, say)."""
        try:
            record = self.ledger.get(pod_id)
        except FileNotFoundError:
            return
        if record["stopped_at_epoch"] is None:
            PodLedger.mark_ended(record, reason, self.clock() if ended is None else ended)
            self.ledger.record(record)

    def list_pods(self) -> list[dict]:
        """Every pod of the account the API still shows (and bills), with its env."""
        return self._call("listing pods", self.runpod.get_pods)

    def sweep(self, run_only: bool = True, reason: str = "sweep") -> list[str]:
        """Terminate every pod named by this pipeline (this run's, or all of them):
        the last line of defence against a pod left running, such as one whose creation
        a signal interrupted before its id came back."""
        prefix = f"{POD_NAME_PREFIX}{self.run_id}-" if run_only else POD_NAME_PREFIX
        ended = []
        for pod in self.list_pods():
            name = pod.get("name", "")
            if name.startswith(prefix):
                if name in self._creating:  # created, but its record may never have been written
                    self._record_if_unrecorded(pod["id"], name)
                self.terminate_pod(pod["id"], reason=reason)
                ended.append(pod["id"])
        return ended
