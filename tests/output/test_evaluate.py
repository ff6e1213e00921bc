"""``python -m pipeline evaluate``: retrieval figures from the corpus itself, for every way
an output can be searched, so a storage choice shows what it costs (pipeline/output/evaluate.py).

The shared corpus is used where it is present (real prose tells storage choices apart
better than generated text), else generated documents."""

import json

import numpy as np
import pytest

from helpers import SHARED_CORPUS, write_corpus
from pipeline.cli import main
from pipeline.core.corpus import write_manifest
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.core.vector_format import VectorFormat
from pipeline.output.compact import compact_output
from pipeline.output.evaluate import TOP, Retrieval, TopDocuments, evaluate, query_of, read_evaluation
from pipeline.output.summary import publish_summary, run_summary


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, embedder):
    """One corpus stored as float32, and again as float16 with both compact columns."""
    root = tmp_path_factory.mktemp("evaluate")
    if SHARED_CORPUS.is_dir() and any(SHARED_CORPUS.rglob("*.md")):
        per_shard = 12  # its 24 shortest documents (64 KB): the suite stays quick
        files = sorted(SHARED_CORPUS.rglob("*.md"), key=lambda path: (path.stat().st_size, path))[:24]
        corpus = root / "corpus"
        for path in files:
            (corpus / path.relative_to(SHARED_CORPUS)).parent.mkdir(parents=True, exist_ok=True)
            (corpus / path.relative_to(SHARED_CORPUS)).write_bytes(path.read_bytes())
    else:
        corpus, per_shard = write_corpus(root / "corpus", documents=24, words=240), 12
    plain = root / "plain"
    manifest = str(plain / "manifest.parquet")
    shards = -(-write_manifest(str(corpus), "*.md", per_shard, manifest) // per_shard)
    for shard in range(shards):
        run_shard(ShardJob(str(corpus), manifest, str(plain), shards), shard, embedder)
    publish_summary(str(plain), run_summary(str(plain), shards, {}))
    small = root / "small"
    assert compact_output(str(plain), str(small), vector_format=VectorFormat("float16", ("binary", "int8"))).ok
    return plain, small


def test_a_query_is_a_sentence_of_its_document_found_in_the_chunks_that_hold_it():
    chunks = {0: "# Capital\n\nShort one. The owner of money must meet in the market with the free labourer, free in a double sense.",
              1: "free in a double sense. | a | table row with many words in it to be left out of the queries |",
              2: "Another sentence that is long enough to count as a query for this document."}
    query = query_of("doc-1", chunks)
    assert query == query_of("doc-1", chunks)  # the same every time
    assert query.text in {"The owner of money must meet in the market with the free labourer, free in a double sense.",
                          "Another sentence that is long enough to count as a query for this document."}
    assert query.chunk_ids == ((0,) if query.text.startswith("The owner") else (2,))
    assert "Capital" not in query.text and "|" not in query.text
    assert query_of("doc-2", {0: "# Only a heading", 1: "Too short."}) is None


def test_documents_are_ranked_by_their_best_chunk_across_shards():
    top = TopDocuments(queries=2)
    top.add(np.array([[0.1, 0.9, 0.2], [0.5, 0.1, 0.1]]), ["a", "b", "b"])
    top.add(np.array([[0.95, 0.3], [0.2, 0.6]]), ["c", "d"])
    assert top.ranks(["b", "b"]) == [2, 4]  # b's best chunk, 0.9, after c; for query 2: d 0.6, a 0.5, c 0.2, b 0.1
    assert top.ranks(["z", "a"]) == [0, 2]
    assert Retrieval([1, 2, 0, 11]).figures() == {"recall_at_1": 0.25, "recall_at_10": 0.5, "mrr_at_10": 0.375}
    assert TOP == 10


def test_every_way_of_searching_is_scored_and_float16_costs_almost_nothing(outputs, embedder):
    plain, small = outputs
    full = evaluate(str(plain), embedder=embedder)
    assert full["queries"] >= 20 and set(full["retrieval"]) == {"vectors"} and "full_precision_sample" not in full
    assert full["bytes_per_chunk"] == {"vectors": 384 * 4}
    recall = full["retrieval"]["vectors"]["recall_at_10"]
    assert 0.3 < recall <= 1.0, full  # its own document is found, mostly

    compact = evaluate(str(small), sample=6, embedder=embedder)
    assert compact["queries"] == full["queries"]  # the same documents give the same queries
    assert set(compact["retrieval"]) == {"vectors", "int8", "binary_rescored"}
    assert compact["bytes_per_chunk"] == {"vectors": 768, "int8": 384, "binary": 48}
    figures = compact["retrieval"]
    assert abs(figures["vectors"]["recall_at_10"] - recall) <= 0.02
    assert abs(figures["int8"]["recall_at_10"] - recall) <= 0.05
    assert figures["binary_rescored"]["recall_at_10"] <= 1.0
    sample = compact["full_precision_sample"]
    assert sample["documents"] == 6 and sample["queries"] >= 1 and sample["chunks"] >= sample["documents"]
    assert abs(sample["stored"]["mrr_at_10"] - sample["full_precision"]["mrr_at_10"]) <= 0.2


def test_the_command_prints_the_table_and_keeps_the_figures_for_the_report(outputs, capsys):
    plain, _ = outputs
    assert main(["evaluate", str(plain), "--documents", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "queries (a sentence of a sampled document" in lines[0]
    assert lines[1].split() == ["searched", "on", "bytes/chunk", "recall@1", "recall@10", "MRR@10"]
    assert lines[2].split()[:2] == ["vectors", "1,536"]
    kept = read_evaluation(str(plain))
    assert kept["retrieval"]["vectors"] and kept["evaluated_at"]
    assert (plain / "_runs" / "evaluation.json").is_file()

    from pipeline.output.report import gather, totals_rows

    rows = dict(totals_rows(gather(str(plain))))
    assert rows["retrieval"].startswith(f"recall@10 {kept['retrieval']['vectors']['recall_at_10']:.3f} (vectors) over ")
    assert rows["vectors stored as"] == "float32"

    assert main(["evaluate", str(plain), "--documents", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == kept["queries"]
