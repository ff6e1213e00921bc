"""The pod's entrypoint: run the shard work, then terminate this pod, whatever happens.

A launcher on a laptop can die (lid closed, SIGKILL), and Runpod's own stop timers
cannot be relied on, so the pod ends itself: when its work finishes or fails, when no
shard has appeared for its idle time, past its runtime or its share of the spend
(``Limits``: what the launcher said, else the pod's own settings), and on SIGTERM/SIGINT. Inside a pod Runpod sets ``RUNPOD_POD_ID`` and a
pod-scoped ``RUNPOD_API_KEY``.

    python -m pipeline.runpod.watchdog [extra luigi arguments]
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.runpod.pod_env import PROTOCOL, PodIdentity, PodWorkers, decode_env
from pipeline.settings import declared, default
from pipeline.runpod.sdk import import_runpod

log = logging.getLogger("pipeline.watchdog")


@dataclass
class Limits:
    idle_seconds: float = default("idle_seconds")  # no new shard for this long: something is wrong
    max_seconds: float = default("watchdog_max_seconds")
    max_dollars: float = float("inf")
    price_per_hour: float = 0.0  # the launcher's; the API's costPerHr comes first
    check_every: float = default("watchdog_check_seconds")

    _ENV_NAMES = {"idle_seconds": "IDLE_SECONDS", "max_seconds": "MAX_SECONDS", "max_dollars": "MAX_DOLLARS",
                  "price_per_hour": "PRICE_PER_HOUR", "check_every": "CHECK_SECONDS"}
    # Where the launcher says nothing, the pod's own settings (its environment) decide.
    _SETTINGS = {"max_seconds": "watchdog_max_seconds", "check_every": "watchdog_check_seconds"}

    def to_env(self) -> dict[str, str]:
        """The limits a launcher gives its pod's watchdog, as ``from_env`` reads them
        there: those that differ from the watchdog's own defaults."""
        defaults = Limits()
        return {f"{PROTOCOL}WATCHDOG_{name}": format(getattr(self, field), ".15g") for field, name in self._ENV_NAMES.items()
                if getattr(self, field) != getattr(defaults, field)}

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Limits":
        values = {field: env.get(f"{PROTOCOL}WATCHDOG_{name}") for field, name in cls._ENV_NAMES.items()}
        for field, setting in cls._SETTINGS.items():
            if values[field] in (None, ""):
                values[field] = env.get(declared(setting).env)
        return cls(**{field: float(value) for field, value in values.items() if value not in (None, "")})


def terminate_own_pod(env: dict[str, str], max_wait: float = 60, before_retry: Callable[[], None] = lambda: None) -> bool:
    """Terminate the pod this runs in, and keep at it until the API no longer shows it:
    the SDK's terminate returns normally on a 5xx, and a pod left running costs money
    every second. ``before_retry`` runs before each attempt after the first (the ledger's
    stop time moves with it). Never raises. (A successful terminate kills this very process.)"""
    pod_id, key = env.get("RUNPOD_POD_ID"), env.get("RUNPOD_API_KEY")
    if not pod_id or not key:
        log.warning("watchdog: RUNPOD_POD_ID or RUNPOD_API_KEY missing: not in a pod, nothing to terminate")
        return False
    runpod = import_runpod()
    runpod.api_key = key
    attempt = 0
    while True:
        attempt += 1
        try:
            runpod.terminate_pod(pod_id)
            if runpod.get_pod(pod_id) is None:
                log.info("watchdog: terminated pod %s", pod_id)
                return True
            log.warning("watchdog: pod %s still exists after terminate (attempt %d)", pod_id, attempt)
        except Exception as exc:
            log.warning("watchdog: terminating pod %s failed (%s); attempt %d", pod_id, exc, attempt)
        time.sleep(min(2**attempt, max_wait))
        before_retry()


def _price_per_hour(env: dict[str, str], limits: Limits) -> float:
    """This pod's own billed price from the API; else the launcher's listed price."""
    try:
        runpod = import_runpod()
        runpod.api_key = env["RUNPOD_API_KEY"]
        return float(runpod.get_pod(env["RUNPOD_POD_ID"])["costPerHr"])
    except Exception as exc:
        if limits.price_per_hour:
            return limits.price_per_hour
        log.warning("watchdog: could not read this pod's price (%s); the dollar budget is not enforced", exc)
        return 0.0


def supervise(
    commands: list[tuple[list[str], dict[str, str]]],
    limits: Limits,
    output: str,
    env: dict[str, str],
    stopping: list[str],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, str]:
    """Run the worker ``commands`` (each with its env) until all end, a limit is passed
    or a signal lands in ``stopping``; returns (exit code, reason). A worker that fails
    leaves the others going: on a shared scheduler they take over its shards.

    Args:
        commands: each worker's command line and environment.
        limits: idle time, runtime and dollars after which the pod ends itself.
        output: the run's output (its shards show progress; its ledger the price).
        env: the pod's environment (its identity, for the ledger).
        stopping: the signal handler appends the signal's name here.
        clock: seconds, for the limits.
    """
    # Runtime and spend count from the pod's creation (provisioning is billed too).
    created = PodIdentity.from_env(env).created_at or time.time()
    started = clock() - max(time.time() - created, 0)
    price = _price_per_hour(env, limits)
    children = [subprocess.Popen(command, env=child_env) for command, child_env in commands]
    shards, last_progress = None, clock()
    try:
        while True:
            deadline = time.monotonic() + limits.check_every
            while any(child.poll() is None for child in children) and time.monotonic() < deadline:
                time.sleep(min(0.2, limits.check_every))
            codes = [child.poll() for child in children]
            if None not in codes:
                failed = [(n, code) for n, code in enumerate(codes) if code != 0]
                if not failed:
                    return 0, "finished"
                which = "" if len(children) == 1 else f"worker {failed[0][0]} of {len(children)}: "
                return failed[0][1], f"the work failed ({which}exit code {failed[0][1]})"
            now = clock()
            if stopping:
                reason = stopping[0]
            elif now - started > limits.max_seconds:
                reason = f"runtime passed {limits.max_seconds:g}s"
            elif price and (now - started) / 3600 * price > limits.max_dollars:
                reason = f"spend passed ${limits.max_dollars:.2f}"
            elif not output:
                continue
            else:
                try:
                    from pipeline.output.status import count_shards

                    current = count_shards(output)
                except Exception as exc:  # a storage hiccup is not idleness
                    log.warning("watchdog: could not count shards (%s)", exc)
                    current = shards
                if current != shards:
                    shards, last_progress = current, now
                if now - last_progress > limits.idle_seconds:
                    reason = f"no new shard for {limits.idle_seconds:g}s"
                else:
                    continue
            log.error("watchdog: stopping the work: %s", reason)
            _stop(children)
            return 1, reason
    finally:
        _stop(children)


def _stop(processes: list[subprocess.Popen], grace: float = 30) -> None:
    """SIGTERM, then SIGKILL whatever has not ended within ``grace`` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# A worker of a run shared on one luigid (`make worker` passes the same flags): it waits
# for shards given back by a lost worker, and exits 0 when its part went well though
# other workers ran the rest (luigi's "run by another worker" and "not granted" codes).
SHARED_RUN_FLAGS = ("--worker-keep-alive", "--no-lock", "--retcode-already-running", "0", "--retcode-not-run", "0")


def work_command(scheduler_url: str, extra: list[str]) -> list[str]:
    """EmbedAll as a worker on a shared scheduler (several pods or GPUs), else alone."""
    scheduler = ["--scheduler-url", scheduler_url, *SHARED_RUN_FLAGS] if scheduler_url else ["--local-scheduler"]
    return [sys.executable, "-m", "luigi", "--module", "pipeline", "EmbedAll", *scheduler, *extra]


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """The workers' environment: the bucket credentials, without what only the watchdog
    needs (the pod's Runpod key, to end its pod) or the encoded forms ``decode_env``
    has already restored (a Google key among them)."""
    return {name: value for name, value in env.items() if name != "RUNPOD_API_KEY" and not name.endswith("_B64")}


def worker_commands(env: dict[str, str], extra: list[str], scheduler_url: str) -> list[tuple[list[str], dict[str, str]]]:
    """One worker per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``), so each
    loads the model once onto its device and runs shards there."""
    gpus = PodWorkers.from_env(env).gpus
    if gpus == 1:
        return [(work_command(scheduler_url, extra), env)]
    return [(work_command(scheduler_url, extra), {**env, "CUDA_VISIBLE_DEVICES": str(gpu)}) for gpu in range(gpus)]


def start_pod_scheduler(folder: str) -> tuple[subprocess.Popen, str]:
    """A luigid on this pod's loopback for its GPUs' workers to share, when no scheduler
    URL was given (one pod with several GPUs); its state and history under ``folder``."""
    import socket

    os.makedirs(folder, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # luigi.cfg's [scheduler] settings hold; its state and history paths point here.
    overrides = os.path.join(folder, "luigi.cfg")
    with open(overrides, "w") as file:
        file.write(f"[scheduler]\nstate_path = {folder}/state.pickle\n"
                   f"[task_history]\ndb_connection = sqlite:///{folder}/task-history.db\n")
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from luigi.cmdline import luigid; luigid(sys.argv[1:])",
         "--address", "127.0.0.1", "--port", str(port)],
        env={**worker_env(dict(os.environ)), "LUIGI_CONFIG_PATH": overrides},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                _stop([process])
                raise RuntimeError(f"the pod's own scheduler did not start (exit code {process.poll()})")
            time.sleep(0.1)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from pipeline.config import prepare_run

    prepare_run(exit_codes=False)  # storage retries from the launcher's settings, as the workers have them
    env = dict(os.environ)
    output = env.get(declared("output").env, "")
    code, reason = 1, "the watchdog itself failed"
    pod_scheduler = None
    stopping: list[str] = []

    def on_signal(number, _frame):
        stopping.append(f"signal {signal.Signals(number).name}")

    for number in (signal.SIGTERM, signal.SIGINT):  # first: a signal during start-up still ends the pod
        signal.signal(number, on_signal)
    try:  # everything inside: whatever fails, the finally ends the pod
        env.update(decode_env(env))
        if env.get("GOOGLE_CREDENTIALS_JSON"):
            # A service-account key passed in the pod's env: to a private file, never logged.
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gcp-credentials.json")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(env.pop("GOOGLE_CREDENTIALS_JSON"))
            env["GOOGLE_APPLICATION_CREDENTIALS"] = path
        output = env.get(declared("output").env, "")
        workers = PodWorkers.from_env(env)
        scheduler_url = workers.scheduler_url
        if workers.gpus > 1 and not scheduler_url:
            pod_scheduler, scheduler_url = start_pod_scheduler(tempfile.mkdtemp(prefix="pod-luigid-"))
            log.info("watchdog: %d GPUs: one worker each, sharing this pod's scheduler at %s", workers.gpus, scheduler_url)
        commands = worker_commands(worker_env(env), argv if argv is not None else sys.argv[1:], scheduler_url)
        code, reason = supervise(commands, Limits.from_env(env), output, env, stopping)
    except Exception as exc:
        log.error("watchdog: %s", exc)
    finally:
        if pod_scheduler is not None:
            _stop([pod_scheduler])
        log.info("watchdog: work ended (%s); ending this pod", reason)
        pod_id = env.get("RUNPOD_POD_ID", "")
        import_runpod()  # imported now, so the ledger's stop time is the real one

        # Into the ledger first: a terminated pod's container is killed at once, so
        # nothing after a successful terminate runs. The launcher may be gone.
        ledger_updated = bool(pod_id and output) and record_end(output, pod_id, f"watchdog: {reason}", env)
        # A terminate that failed is tried again later: the pod is billed until then.
        later = (lambda: record_end(output, pod_id, f"watchdog: {reason}", env, again=True)) if ledger_updated else (lambda: None)
        if not terminate_own_pod(env, before_retry=later) and ledger_updated:
            record_end(output, pod_id, None, env)  # it is still running after all: say so
    return code


def record_end(output: str, pod_id: str, reason: Optional[str], env: dict[str, str], again: bool = False) -> bool:
    """Mark the pod ended now in the ledger (``reason`` None: running again; ``again``:
    move an end this watchdog wrote to now, before another try). Writes the whole record
    from the pod's env if the launcher died before writing it."""
    from pipeline.output.ledger import PodLedger

    try:
        ledger = PodLedger(output)
        try:
            record = ledger.get(pod_id)
        except FileNotFoundError:
            record = PodIdentity.from_env(env).ledger_record(pod_id, _price_per_hour(env, Limits.from_env(env)),
                                                             PodWorkers.from_env(env).gpus, time.time())
        if reason is None:
            record.update(stopped_at=None, stopped_at_epoch=None, end_reason="watchdog could not terminate it")
        elif again and record["end_reason"] == reason:
            record.update(stopped_at=None, stopped_at_epoch=None)
            PodLedger.mark_ended(record, reason, time.time())
        else:
            PodLedger.mark_ended(record, reason, time.time())
        ledger.record(record)
        return True
    except Exception as exc:  # a missing record is no reason not to end the pod
        log.warning("watchdog: could not update the pod's ledger record: %s", exc)
        return False


if __name__ == "__main__":
    sys.exit(main())
