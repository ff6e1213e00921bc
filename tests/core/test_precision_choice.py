"""``--precision auto`` on a CPU: the faster precision whose vectors agree with float32's,
by measuring; the choice and its reason are in every shard; a machine measures once."""

import json

import pytest

from helpers import write_corpus
from pipeline.core import precision_choice
from pipeline.core.corpus import write_manifest
from pipeline.core.embedder import Embedder
from pipeline.core.precision_choice import AGREEMENT, Measured
from pipeline.core.profiles import PROFILES
from pipeline.core.shard_file import shard_stats
from pipeline.core.shard_job import ShardJob, run_shard


@pytest.fixture
def bf16_cpu(monkeypatch, tmp_path):
    """A CPU with bf16 instructions, and a cache of choices of its own."""
    monkeypatch.setattr(precision_choice, "native_bf16_cpu", lambda: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def timed(float32: float, bfloat16: float, agreement: float = 0.99998):
    calls = []

    def measure(embedder):
        calls.append(embedder)
        return Measured({"float32": float32, "bfloat16": bfloat16}, {"float32": 1.0, "bfloat16": agreement})

    return measure, calls


def auto_embedder():
    return Embedder(PROFILES["minilm"], "", "cpu", 0, 4096, "auto")


@pytest.mark.parametrize("float32, bfloat16, agreement, chosen", [
    (7511, 4579, 0.99998, "float32"),  # bf16 slower (issue 42's CPU, torch 2.13)
    (4000, 7200, 0.99998, "bfloat16"),  # bf16 faster (the same kind of CPU with an older torch)
    (4000, 7200, AGREEMENT - 1e-4, "float32"),  # faster, but its vectors stray too far
])
def test_auto_keeps_the_faster_precision_whose_vectors_agree(bf16_cpu, monkeypatch, float32, bfloat16, agreement, chosen):
    measure, calls = timed(float32, bfloat16, agreement)
    monkeypatch.setattr(precision_choice, "measure_precisions", measure)
    embedder = auto_embedder()
    assert embedder.precision == chosen and len(calls) == 1
    assert embedder.runtime()["precision_choice"].startswith(f"{chosen}: measured on this CPU")


def test_the_choice_is_measured_once_per_machine_and_recorded_in_every_shard(bf16_cpu, monkeypatch, tmp_path):
    measure, calls = timed(7511, 4579)
    monkeypatch.setattr(precision_choice, "measure_precisions", measure)
    first, second = auto_embedder(), auto_embedder()
    assert (first.precision, second.precision, len(calls)) == ("float32", "float32", 1)
    assert "measured before" in second.precision_reason
    cache = json.loads((tmp_path / "cache" / "embedding-pipeline" / "precision-choices.json").read_text())
    assert [choice["precision"] for choice in cache.values()] == ["float32"]
    corpus = write_corpus(tmp_path / "corpus", documents=2, words=40)
    manifest = str(tmp_path / "out" / "manifest.parquet")
    write_manifest(str(corpus), "*.md", 2, manifest)
    run_shard(ShardJob(str(corpus), manifest, str(tmp_path / "out"), 1), 0, second)
    stats = shard_stats(str(tmp_path / "out" / "shards" / "shard-000000.parquet"))
    assert stats["precision_choice"].startswith("float32: measured on this CPU")


def test_the_real_measurement_times_both_and_compares_their_vectors(bf16_cpu):
    """What ``make bench`` and a run's first load do on this CPU (no stub)."""
    embedder = Embedder(PROFILES["minilm"], "", "cpu", 0, 1024, "float32")
    measured = precision_choice.measure_precisions(embedder)
    assert set(measured.tokens_per_second) == {"float32", "bfloat16"} and min(measured.tokens_per_second.values()) > 0
    assert measured.agreement["float32"] == pytest.approx(1.0, abs=1e-5)
    assert 0.999 < measured.agreement["bfloat16"] <= 1.0 + 1e-5
    assert embedder.precision == "float32" and embedder.padded_tokens == 0  # measuring leaves no trace on the run
