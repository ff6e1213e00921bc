"""The pod's watchdog entrypoint, run as a real process against the fake Runpod API:
whatever ends the work, the pod is terminated."""

import json
import signal
import socket
import subprocess
import sys

import pytest

from fake_runpod import FakeRunpod
from helpers import ROOT, luigi_env, wait_for, write_corpus
from pipeline.runpod.orchestrator import PodLedger, PodSettings, RunpodOrchestrator
from pipeline.core.shard_file import shard_stats
from pipeline.runpod.watchdog import worker_commands

pytestmark = pytest.mark.slow


@pytest.fixture
def pod(monkeypatch, tmp_path):
    """A started pod on the fake API, and the environment Runpod gives its container."""
    api = FakeRunpod(provisioning_seconds=0)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", api.url)
    monkeypatch.setenv("HOME", str(tmp_path))
    orchestrator = RunpodOrchestrator(PodSettings(image="img"), PodLedger(str(tmp_path / "ledger")), api_key=api.api_key)
    pod_id = orchestrator.start_pod()
    env = luigi_env(
        HOME=str(tmp_path), RUNPOD_API_BASE_URL=api.url, RUNPOD_POD_ID=pod_id, RUNPOD_API_KEY=api.api_key,
        PIPELINE_CORPUS=str(write_corpus(tmp_path / "corpus", documents=8, words=200)),
        PIPELINE_OUTPUT=str(tmp_path / "out"), PIPELINE_DOCS_PER_SHARD="2", PIPELINE_DEVICE="cpu",
        PIPELINE_WATCHDOG_CHECK_SECONDS="0.2", TMPDIR=str(tmp_path),  # a pod's own /tmp: Luigi's run lock is there
    )
    yield api, pod_id, env, tmp_path / "out"
    try:
        assert api.running_pods() == [], "a pod was left running"
    finally:
        orchestrator.sweep()
        api.stop()


def watchdog(env, **extra):
    return subprocess.Popen([sys.executable, "-m", "pipeline.runpod.watchdog"], cwd=ROOT, env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300):
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # a test that times out leaves nothing running
            process.kill()
            process.wait()
    return process.returncode, output


def test_finished_work_ends_the_pod(pod):
    api, pod_id, env, output = pod
    code, log = finish(watchdog(env))
    assert code == 0, log[-3000:]
    assert json.loads((output / "_SUCCESS.json").read_text())["documents"] == 8
    assert api.pods[pod_id].terminated_at is not None
    assert "work ended (finished); ending this pod" in log


def test_failed_work_ends_the_pod_and_exits_nonzero(pod, tmp_path):
    api, pod_id, env, output = pod
    code, log = finish(watchdog(env, PIPELINE_CORPUS=str(tmp_path / "no-such-corpus")))
    assert code != 0
    assert "the work failed" in log and api.pods[pod_id].terminated_at is not None


def test_runtime_limit_stops_the_work_and_ends_the_pod(pod):
    api, pod_id, env, output = pod
    code, log = finish(watchdog(env, PIPELINE_WATCHDOG_MAX_SECONDS="1"))
    assert code == 1 and "runtime passed 1s" in log
    assert not (output / "_SUCCESS.json").exists()
    assert api.pods[pod_id].terminated_at is not None


def test_no_new_shard_for_too_long_stops_the_work_and_ends_the_pod(pod):
    api, pod_id, env, output = pod
    code, log = finish(watchdog(env, LAUNCH_WATCHDOG_IDLE_SECONDS="0.5"))
    assert code == 1 and "no new shard for 0.5s" in log
    assert api.pods[pod_id].terminated_at is not None


def test_dollar_budget_stops_the_work_and_ends_the_pod(pod):
    api, pod_id, env, output = pod
    # The API bills this pod $3600/h, a dollar a second: a $1 budget ends the work within
    # about a second. The pod's own price counts, not the lower one the launcher listed.
    api.pods[pod_id].cost_per_hr = 3600
    code, log = finish(watchdog(env, LAUNCH_WATCHDOG_MAX_DOLLARS="1", LAUNCH_WATCHDOG_PRICE_PER_HOUR="0.34"))
    assert code == 1 and "spend passed $1.00" in log
    assert api.pods[pod_id].terminated_at is not None


def test_sigterm_stops_the_work_and_ends_the_pod(pod):
    api, pod_id, env, output = pod
    process = watchdog(env)
    # Once its worker has written the manifest the watchdog has its handlers (it sets them
    # before starting the work); a fixed two seconds was too short on a loaded machine,
    # where SIGTERM then met Python's default handler (exit -15).
    wait_for(lambda: (output / "manifest.parquet").exists() or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    code, log = finish(process)
    assert code == 1 and "signal SIGTERM" in log
    assert api.pods[pod_id].terminated_at is not None


def test_a_pod_with_several_gpus_runs_one_pinned_worker_per_gpu(pod, tmp_path):
    """Three GPUs and no scheduler URL: three workers share a luigid the pod starts on
    its loopback, each sees only its own GPU and loads the model once; all end with the pod."""
    api, pod_id, env, output = pod
    corpus = write_corpus(tmp_path / "corpus-24", documents=24, words=200)
    code, log = finish(watchdog(env, LAUNCH_GPUS="3", PIPELINE_CORPUS=str(corpus)))
    assert code == 0, log[-3000:]
    stats = [shard_stats(str(path)) for path in sorted((output / "shards").glob("shard-*.parquet"))]
    assert [s["shard"] for s in stats] == list(range(12))
    assert {s["cuda_visible_devices"] for s in stats} == {"0", "1", "2"}
    assert len({s["worker"] for s in stats}) == 3
    assert log.count("loading model") == 3, "each worker loads the model once, whatever number of shards it runs"
    url = log.split("sharing this pod's scheduler at ")[1].split()[0]
    with pytest.raises(OSError):  # the pod's own scheduler ended with the work
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1)
    assert api.pods[pod_id].terminated_at is not None


def test_workers_of_a_several_gpu_pod_join_the_given_scheduler():
    commands = worker_commands({"LAUNCH_GPUS": "2"}, ["--workers", "1"], "http://scheduler:8082")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in commands] == ["0", "1"]
    for command, _ in commands:
        assert command[command.index("--scheduler-url") + 1] == "http://scheduler:8082"
        assert "--local-scheduler" not in command and "--worker-keep-alive" in command
    [(alone, env)] = worker_commands({}, [], "")
    assert "--local-scheduler" in alone and "CUDA_VISIBLE_DEVICES" not in env
