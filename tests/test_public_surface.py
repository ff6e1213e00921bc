"""What a user sees stays as it is whatever the inside becomes: the names ``from pipeline
import …`` gives, the Luigi tasks and their parameters, the ``python -m pipeline``
commands and the Makefile targets; and every package can be star-imported."""

import re

import luigi
import pytest

import pipeline
from helpers import ROOT
from pipeline.cli import main

PUBLIC_NAMES = {
    "CorpusManifest", "EmbedAll", "EmbedShard", "RunpodEmbedAll", "EmbeddingInterface", "Checkpoint", "RunFailed",
    "RunpodOrchestrator", "PodSettings", "PodLedger", "PodError", "NoCapacity", "PodStuck",
    "EmbeddingBatch", "embedding_stats", "list_embedding_files", "read_shard", "stream_embeddings",
}
RUN_PARAMETERS = {"corpus", "output", "pattern", "docs_per_shard", "model", "model_path", "max_tokens", "batch_tokens",
                  "device", "precision", "readers", "add_new_documents", "sync", "skip_duplicates", "vector_dtype",
                  "dimensions", "compact_columns"}
LAUNCHER_PARAMETERS = RUN_PARAMETERS | {
    "image", "gpu_types", "cloud_type", "spot", "spot_relaunches", "max_dollars", "pods", "pods_scheduler_url",
    "gpus_per_pod", "poll_seconds", "first_shard_seconds", "idle_seconds", "provisioning_seconds", "capacity_seconds"}
COMMANDS = {"status", "verify", "compact", "evaluate", "search", "cost", "pods", "report", "image", "model", "estimate", "bench",
            "settings"}
MAKE_TARGETS = {"setup", "embed", "worker", "test", "check", "chaos", "verify", "report", "bench", "image",
                "cost-estimate", "luigid", "luigid-stop", "clean"}


def test_the_public_names_stay():
    assert set(pipeline.__all__) == PUBLIC_NAMES
    assert all(getattr(pipeline, name, None) is not None for name in PUBLIC_NAMES)


@pytest.mark.parametrize("family, parameters", [
    ("CorpusManifest", RUN_PARAMETERS), ("EmbedShard", RUN_PARAMETERS | {"shard"}), ("EmbedAll", RUN_PARAMETERS),
    ("RunpodEmbedAll", LAUNCHER_PARAMETERS),
])
def test_the_luigi_tasks_keep_their_names_and_parameters(family, parameters):
    task = luigi.task_register.Register.get_task_cls(family)
    assert {name for name, _ in task.get_params()} == parameters


def test_the_commands_stay(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    listed = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1)
    assert set(listed.split(",")) == COMMANDS


def test_the_make_targets_stay():
    makefile = (ROOT / "Makefile").read_text()
    assert set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M)) == MAKE_TARGETS


def test_every_package_can_be_star_imported():
    """``__all__`` names only what exists (pipeline.storage listed a ``Backend`` it never had)."""
    for package in ("pipeline", "pipeline.storage", "pipeline.core", "pipeline.output", "pipeline.runpod"):
        namespace: dict = {}
        exec(f"from {package} import *", namespace)
