"""The launcher->pod environment contract: what one side writes, the other reads back."""

import pytest

from pipeline import config
from pipeline.runpod.pod_env import PodIdentity, PodWorkers, settings_env
from pipeline.runpod.watchdog import Limits


def test_run_settings_reach_the_pods_workers_as_their_settings(monkeypatch):
    env = settings_env({"corpus": "gs://b/corpus", "docs_per_shard": 250, "skip_duplicates": True, "model_path": None})
    assert env == {"PIPELINE_CORPUS": "gs://b/corpus", "PIPELINE_DOCS_PER_SHARD": "250", "PIPELINE_SKIP_DUPLICATES": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (config.setting("corpus"), config.setting("docs_per_shard"), config.setting("skip_duplicates")) == (
        "gs://b/corpus", "250", "true")
    with pytest.raises(ValueError, match="not settings that travel to pods"):
        settings_env({"corpsu": "x"})


def test_a_pods_identity_and_workers_survive_the_trip():
    identity = PodIdentity(name="embedding-pipeline-ab", run_id="r1", gpu_type="NVIDIA H200", cloud_type="SECURE",
                           image="reg/img:1", created_at=1700000000.5, price_per_hour=3.99)
    assert PodIdentity.from_env(identity.to_env()) == identity
    unpriced = PodIdentity(name="n", created_at=5.0)
    assert "LAUNCH_WATCHDOG_PRICE_PER_HOUR" not in unpriced.to_env()  # the watchdog asks the API rather than trust a 0
    record = identity.ledger_record("pod1", price=3.5, gpu_count=2, now=1800000000.0)
    assert (record["pod_id"], record["run_id"], record["started_at_epoch"], record["gpu_count"], record["price_per_hour"]) == (
        "pod1", "r1", 1700000000.5, 2, 3.5)
    assert PodIdentity.from_env({}).ledger_record("p", 0.0, 1, now=42.0)["started_at_epoch"] == 42.0
    workers = PodWorkers(gpus=4, scheduler_url="http://10.0.0.2:8082")
    assert PodWorkers.from_env(workers.to_env()) == workers
    assert PodWorkers.from_env({"RUNPOD_GPU_COUNT": "2"}).gpus == 2  # a pod started by hand: Runpod's count


def test_watchdog_limits_travel_when_they_differ_from_its_defaults():
    limits = Limits(idle_seconds=1800, max_dollars=12.5, check_every=0.2)
    env = limits.to_env()
    assert set(env) == {"LAUNCH_WATCHDOG_IDLE_SECONDS", "LAUNCH_WATCHDOG_MAX_DOLLARS", "LAUNCH_WATCHDOG_CHECK_SECONDS"}
    assert Limits.from_env(env) == limits
    assert Limits().to_env() == {}


def test_every_setting_of_a_run_reaches_the_pods_workers_with_no_list_in_the_launcher(tmp_path):
    from pipeline import EmbedAll, RunpodEmbedAll
    from pipeline.config import DEFAULTS

    env = RunpodEmbedAll(corpus=str(tmp_path), output=str(tmp_path / "out"), image="img", model_path="/models/x").pod_env()
    settings = {name for name, _ in EmbedAll.get_params() if name in DEFAULTS}
    assert {f"PIPELINE_{name.upper()}" for name in settings} <= set(env)
    assert env["PIPELINE_OUTPUT"] == str(tmp_path / "out") and env["PIPELINE_MODEL_PATH"] == "/models/x"


def test_the_vector_format_reaches_the_pods_workers(tmp_path, monkeypatch):
    from pipeline import EmbedAll, RunpodEmbedAll

    env = RunpodEmbedAll(corpus=str(tmp_path), output=str(tmp_path / "out"), image="img", model="nomic",
                         vector_dtype="float16", dimensions=256, compact_columns="binary,int8").pod_env()
    assert (env["PIPELINE_VECTOR_DTYPE"], env["PIPELINE_DIMENSIONS"], env["PIPELINE_COMPACT_COLUMNS"]) == (
        "float16", "256", "binary,int8")
    for name, value in env.items():
        if name.startswith("PIPELINE_"):
            monkeypatch.setenv(name, value)
    worker = EmbedAll()  # a pod's worker: every setting from its environment
    assert (worker.model, worker.vector_dtype, worker.dimensions, worker.compact_columns) == ("nomic", "float16", 256, "binary,int8")


@pytest.mark.parametrize("setting, message", [
    ({"dimensions": 32}, r"--dimensions 32 is outside what nomic is trained for \(64 to 768\)"),
    ({"vector_dtype": "int4"}, "unknown vector dtype 'int4'"),
    ({"compact_columns": "pq"}, "unknown compact column 'pq'"),
])
def test_the_launcher_refuses_a_vector_setting_before_any_pod_is_paid_for(tmp_path, monkeypatch, setting, message):
    """Every shard on the pod would fail on it: the launcher says so first, and never
    reaches the Runpod API (none is set up here: a call would fail otherwise)."""
    from pipeline import RunpodEmbedAll
    from pipeline.errors import PipelineError

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    launcher = RunpodEmbedAll(corpus=str(tmp_path), output=str(tmp_path / "out"), image="img", model="nomic", **setting)
    with pytest.raises(PipelineError, match=message):
        launcher.run()
    assert not (tmp_path / "out").exists()
