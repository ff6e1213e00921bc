"""The production profile, ``--model nomic``, on this machine: nomic's published layout
(random weights, tests/conftest.py ``nomic_home``) found in a Hugging Face cache as on a
pod, through every path a user takes, and its vectors checked against nomic's
architecture written out in tests/nomic_reference.py (cosine ≥ 0.9999), so a change in
transformers' NomicBert can never change production vectors unnoticed."""

import sys

import luigi
import numpy as np
import pytest
from tokenizers import Tokenizer

from fake_runpod import FakeRunpod, LocalProcesses, assert_no_pod_billed
from helpers import ROOT, embed_here, luigi_env, read_output_rows, run_luigi, write_corpus
from nomic_reference import cosines, nomic_forward
from pipeline import RunpodEmbedAll
from pipeline.core.embedder import Embedder
from pipeline.core.profiles import PROFILES
from pipeline.interface import EmbeddingInterface
from pipeline.output.verify import verify_output

DOCUMENT, QUERY = "search_document: ", "search_query: "
AGREE = 0.9999
TEXTS = ["The philosophers have only interpreted the world, in various ways; the point is to change it.",
         "Capital, Volume I. Chapter 1: Commodities. " * 40,  # several hundred tokens: positions matter
         "a"]


def reference(nomic_home, texts, prefix=DOCUMENT, dimensions=0):
    tokenizer = Tokenizer.from_file(f"{nomic_home.snapshot}/tokenizer.json")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return nomic_forward(nomic_home.snapshot, [tokenizer.encode(prefix + text).ids[:512] for text in texts], dimensions)


def assert_rows_match_reference(nomic_home, rows, dimensions=0):
    texts = [row["text"] for row in rows]
    stored = np.stack([row["embedding_vector"] for row in rows])
    agreement = cosines(stored, reference(nomic_home, texts, dimensions=dimensions))
    assert agreement.min() >= AGREE, agreement


@pytest.mark.parametrize("dimensions", [0, 256])
def test_transformers_nomicbert_computes_nomics_published_architecture(nomic_home, dimensions):
    embedder = Embedder(PROFILES["nomic"], nomic_home.snapshot, "cpu", 0, 4096, "float32", dimensions)
    vectors = embedder.embed_texts(TEXTS)
    assert vectors.shape == (3, dimensions or 768)
    assert cosines(vectors, reference(nomic_home, TEXTS, dimensions=dimensions)).min() >= AGREE
    queries = embedder.embed_texts(TEXTS[:1], prefix=embedder.profile.query_prefix)
    assert cosines(queries, reference(nomic_home, TEXTS[:1], QUERY, dimensions)).min() >= AGREE


def test_generate_embeddings_gives_nomics_vectors(nomic_home, tmp_path):
    interface = EmbeddingInterface(tmp_path / "out", write_corpus(tmp_path / "corpus", documents=1), model="nomic",
                                   model_path=nomic_home.snapshot, device="cpu", precision="float32")
    vectors = interface.generate_embeddings(TEXTS)
    assert cosines(vectors, reference(nomic_home, TEXTS)).min() >= AGREE


@pytest.mark.slow
def test_embed_all_with_model_nomic_from_the_hub_cache_then_verify_search_and_evaluate(nomic_home, tmp_path, monkeypatch):
    """The command a user runs, its weights found as a pod finds them (HF_HOME, no
    --model-path), then what they do with the output (in this process, its hub cache
    pointed at the same home: search and evaluate find the model as the command did)."""
    import huggingface_hub.constants

    from pipeline.output.evaluate import evaluate
    from pipeline.output.search import search

    corpus, output = write_corpus(tmp_path / "corpus", documents=6, words=300), tmp_path / "out"
    run = run_luigi("EmbedAll", "--local-scheduler", "--corpus", str(corpus), "--output", str(output), "--docs-per-shard", "3",
                    "--model", "nomic", "--device", "cpu", "--precision", "float32", **nomic_home.env())
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(read_output_rows(output).values())
    assert len(rows) >= 6 and all(len(row["embedding_vector"]) == 768 for row in rows)
    assert_rows_match_reference(nomic_home, rows)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(nomic_home.home / "hub"))
    assert verify_output(str(output)).ok
    query = "the commodity and its value"
    hits = search(str(output), query, 3)
    [query_vector] = reference(nomic_home, [query], QUERY)
    best = max(float(row["embedding_vector"] @ query_vector) for row in rows)
    assert hits[0]["score"] == pytest.approx(best, abs=1e-4)  # the query went in with nomic's query prefix
    figures = evaluate(str(output), documents=6, sample=0)
    assert figures["queries"] > 0 and figures["dimension"] == 768 and figures["retrieval"]


@pytest.mark.slow
def test_dimensions_256_cuts_as_nomics_model_card_says(nomic_home, tmp_path):
    corpus, output = write_corpus(tmp_path / "corpus", documents=3, words=200), tmp_path / "out"
    embed_here(corpus, output, docs_per_shard=3, model="nomic", model_path=nomic_home.snapshot, precision="float32",
               dimensions=256)
    rows = list(read_output_rows(output).values())
    assert all(len(row["embedding_vector"]) == 256 for row in rows)
    assert_rows_match_reference(nomic_home, rows, dimensions=256)
    assert verify_output(str(output)).ok


@pytest.mark.slow
def test_a_pod_finds_nomic_in_its_hub_cache_and_embeds_it(nomic_home, tmp_path, monkeypatch):
    """The pod's worker path: the watchdog's EmbedAll with the weights where the image
    keeps them (HF_HOME), the model chosen by the launcher."""
    pod_env = luigi_env(HOME=str(tmp_path), PIPELINE_WATCHDOG_CHECK_SECONDS="0.2", **nomic_home.env())
    api = FakeRunpod(provisioning_seconds=0.1, pod_runtime=LocalProcesses(
        [sys.executable, "-m", "pipeline.runpod.watchdog"], pod_env, str(ROOT), tmp_root=str(tmp_path / "pods-tmp")))
    for key, value in {"RUNPOD_API_BASE_URL": api.url, "RUNPOD_API_KEY": api.api_key, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    corpus, output = write_corpus(tmp_path / "corpus", documents=4, words=150), tmp_path / "out"
    try:
        task = RunpodEmbedAll(corpus=str(corpus), output=str(output), docs_per_shard=2, image="registry.local/embedding:test",
                              poll_seconds=0.2, model="nomic", device="cpu", precision="float32")
        assert luigi.build([task], local_scheduler=True, log_level="WARNING")
        assert_no_pod_billed(api)
    finally:
        api.stop()
    assert verify_output(str(output)).ok
    assert_rows_match_reference(nomic_home, list(read_output_rows(output).values()))
