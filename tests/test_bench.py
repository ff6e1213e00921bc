"""``python -m pipeline bench``: the figures are there, consistent, and come from the
real pipeline; and reduced precision stays within its stated tolerance. No timing is
asserted here: speed is measured by the benchmark, never by a test."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, luigi_env, write_corpus
from pipeline.bench import bench_model_path, format_table
from pipeline.runpod.throughput import flops_per_token
from pipeline.core.profiles import PROFILES
from pipeline.core.embedder import Embedder, pick_precision
from pipeline.errors import PipelineError

REQUIRED = ("baseline_tokens_per_s", "embedder_tokens_per_s", "feed_tokens_per_s_per_core", "end_to_end_tokens_per_s",
            "utilisation", "peak_rss_bytes")


@pytest.mark.slow
def test_bench_prints_the_table_and_writes_the_figures(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=250)
    result = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--corpus", str(corpus), "--json", str(tmp_path / "b.json"),
                             "--rounds", "2"],
                            cwd=ROOT, env=luigi_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "b.json").read_text())
    assert all(figures[key] > 0 for key in REQUIRED)
    assert figures["documents"] == 6 and figures["chunks"] >= 6 and figures["tokens"] > 6 * 200
    assert 0 < figures["utilisation"] < 1
    # Baseline and embedder alternate in rounds; the ratio is the rounds' median, the feed a median of runs.
    assert len(figures["embedder_vs_baseline_rounds"]) == 2 and figures["feed_rounds"] == 2
    assert figures["embedder_vs_baseline"] == pytest.approx(np.median(figures["embedder_vs_baseline_rounds"]))
    # The stand-in GPU sleeps through its batches; the time it is busy cannot exceed the run.
    assert 0 < figures["stand_in_gpu_busy"] <= 1 and 0 < figures["stand_in_in_turn_gpu_busy"] <= 1
    assert 0 < figures["stand_in_readers_gpu_busy"] <= 1 and figures["stand_in_reader_processes"] >= 1
    assert figures["feed_readers_wall_tokens_per_s"] > 0 and figures["feed_reader_processes"] == os.cpu_count()
    assert figures["stand_in_end_to_end_tokens_per_s"] <= figures["stand_in_gpu_tokens_per_s"]
    assert figures["min_cosine_vs_baseline"] > 0.9999  # our embedder gives the baseline's vectors
    # Shapes and padding are counted from the batches run: at least one, never less than the real tokens.
    assert 1 <= figures["batch_shapes"] <= figures["chunks"] and 1 <= figures["padded_vs_real_tokens"] < 3
    assert 1 <= figures["stand_in_batch_shapes"] and figures["stand_in_padded_vs_real_tokens"] >= 1  # 16k-token GPU batches of a tiny corpus: mostly padding
    assert len(figures["bucketed_vs_exact_widths_rounds"]) == 2 and figures["worker_cpu_us_per_token_with_readers"] > 0
    assert figures["stand_in_for"] is None
    marked = format_table({**figures, "stand_in_for": "nomic-ai/nomic-embed-text-v1.5"}).splitlines()
    assert all(line.startswith("[stand-in for nomic-ai/nomic-embed-text-v1.5: its published layout, random weights] ") for line in marked if line)
    for row in ("baseline: encode(batch_size=32)", "our embedder", "feed (null model), per CPU core", "end to end", "stand-in GPU", "all in one thread", "reader process", "utilisation",
                "batches as wide as their longest", "distinct shapes", "worker process CPU per token"):
        assert row in result.stdout


def test_flops_per_token_matches_the_published_figure_for_nomic():
    """nomic-embed-text-v1.5: 12 layers of width 768, a SwiGLU MLP of 3072: about 245 MFLOP at 512 tokens."""
    from types import SimpleNamespace

    nomic = SimpleNamespace(n_embd=768, n_layer=12, n_inner=3072, activation_function="swiglu")
    assert flops_per_token(nomic, 512) == pytest.approx(245e6, rel=0.01)
    from transformers import NomicBertConfig  # what the loaded model's config is

    assert flops_per_token(NomicBertConfig(), 512) == flops_per_token(nomic, 512)
    bert = SimpleNamespace(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, hidden_act="gelu")
    assert flops_per_token(bert, 0) == 2 * 6 * (4 * 384 * 384 + 2 * 384 * 1536)


def test_precision_auto_is_fp16_on_cuda_and_measured_on_a_cpu():
    nomic, minilm = PROFILES["nomic"], PROFILES["minilm"]
    assert pick_precision("auto", "cuda", nomic) == "float16"
    assert pick_precision("auto", "cuda:1", minilm) == "float32"
    assert pick_precision("auto", "cpu", minilm) == "float32"  # until the loaded model measures (precision_choice)
    with pytest.raises(PipelineError, match="float16 needs a CUDA device"):
        pick_precision("float16", "cpu", minilm)
    with pytest.raises(PipelineError, match="unknown precision"):
        pick_precision("int8", "cpu", minilm)


def test_bfloat16_on_cpu_stays_within_tolerance_of_float32(embedder):
    texts = [f"Paragraph {i} on the {'labour theory of value' if i % 2 else 'history of the Paris Commune'}, "
             f"with {' and '.join(['more words'] * (i % 7 + 1))}." for i in range(40)]
    bf16 = Embedder(PROFILES["minilm"], "", "cpu", 0, 16384, "bfloat16")
    assert bf16.settings()["precision"] == "bfloat16"
    reduced, full = bf16.embed_texts(texts), embedder.embed_texts(texts)
    assert np.min(np.sum(reduced * full, axis=1)) > 0.9999
    assert np.allclose(np.linalg.norm(reduced, axis=1), 1, atol=1e-5)
    assert not np.array_equal(reduced, full)  # it really ran in reduced precision


def test_bench_measures_a_stand_in_where_the_profiles_weights_are_not_here(tmp_path):
    with pytest.raises(PipelineError):
        PROFILES["nomic"].locate()  # as on every build machine: nomic's weights are never here
    folder = bench_model_path("nomic", "", str(tmp_path))
    assert (tmp_path / "stand-in" / "pipeline_stand_in.json").is_file() and folder == str(tmp_path / "stand-in")
    assert bench_model_path("nomic", "/given", str(tmp_path)) == "/given"
    assert bench_model_path("minilm", "", str(tmp_path)) == PROFILES["minilm"].locate()
