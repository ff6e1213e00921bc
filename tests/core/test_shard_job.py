"""One shard end to end without Luigi: bad input, the schema read back, huge documents."""

import json

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from helpers import write_corpus
from pipeline.core.corpus import write_manifest
from pipeline.core.null_embedder import NullEmbedder
from pipeline.output.layout import OutputLayout
from pipeline.core.shard_job import ShardJob, run_shard


def add_bad_documents(corpus):
    bad = corpus / "bad"
    bad.mkdir()
    (bad / "empty.md").write_bytes(b"")
    (bad / "binary.md").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20)
    (bad / "latin1.md").write_bytes("---\ntitle: Misère\n---\n\nLa misère de la philosophie, réponse.\n".encode("latin-1"))
    (bad / "broken-front-matter.md").write_text("---\ntitle: [oops\n---\n\nThe body survives.\n")
    (bad / "list-author.md").write_text("---\nauthor: [K. Marx, F. Engels]\ndate: 1848-02-21\n---\n\nA spectre.\n")
    (bad / "only-front-matter.md").write_text("---\ntitle: nothing else\n---\n\n")


def run(tmp_path, corpus, embedder, docs_per_shard=100, shard=0, readers=0):
    output = tmp_path / "out"
    manifest = str(output / "manifest.parquet")
    write_manifest(str(corpus), "*.md", docs_per_shard, manifest)
    stats = run_shard(ShardJob(str(corpus), manifest, str(output), 1, readers=readers), shard, embedder)
    return output, stats


def test_bad_documents_are_rejected_with_reasons_and_the_rest_embedded(tmp_path, small_corpus, embedder):
    add_bad_documents(small_corpus)
    output, stats = run(tmp_path, small_corpus, embedder)
    rejects = [json.loads(line) for line in open(OutputLayout.of(str(output)).rejects_of(0))]
    assert {r["path"]: r["reason"] for r in rejects} == {
        "bad/empty.md": "empty",
        "bad/binary.md": "binary",
        "bad/only-front-matter.md": "no_text",
    }
    assert stats["documents"] == 18 and stats["rejected_documents"] == 3 and stats["embedded_documents"] == 15
    assert stats["front_matter_errors"] == 1
    table = pq.read_table(OutputLayout.of(str(output)).shard(0))
    by_path = {}
    for row in table.to_pylist():
        by_path.setdefault(row["metadata"]["path"], []).append(row)
    assert len(by_path) == 15
    listed = by_path["bad/list-author.md"][0]["metadata"]
    assert json.loads(listed["author"]) == ["K. Marx", "F. Engels"] and listed["date"] == "1848-02-21"
    latin = by_path["bad/latin1.md"][0]
    assert latin["text"] == "La misère de la philosophie, réponse."
    assert latin["metadata"]["title"] == "Misère" and latin["metadata"]["encoding"] in ("cp1252", "latin-1")
    broken = by_path["bad/broken-front-matter.md"][0]
    assert broken["text"] == "The body survives." and "not valid YAML" in broken["metadata"]["front_matter_error"]


def test_shard_reads_back_with_plain_pyarrow_and_every_column_checks_out(tmp_path, small_corpus, embedder):
    output, stats = run(tmp_path, small_corpus, embedder)
    path = OutputLayout.of(str(output)).shard(0)
    table = pq.read_table(path)
    schema = table.schema
    assert schema.names == ["doc_id", "chunk_id", "embedding_vector", "text", "metadata"]
    assert schema.field("doc_id").type == pa.string()
    assert schema.field("chunk_id").type == pa.int32()
    assert schema.field("embedding_vector").type == pa.list_(pa.float32(), 384)
    assert schema.field("text").type == pa.string()
    assert pa.types.is_struct(schema.field("metadata").type)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "SNAPPY"
    meta = {k.decode(): v.decode() for k, v in pq.ParquetFile(path).metadata.metadata.items()}
    assert meta["pipeline.model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline.dimension"] == "384" and meta["pipeline.prefix"] == ""
    assert int(meta["pipeline.chunk_max_tokens"]) < int(meta["pipeline.max_tokens"]) == 256
    assert json.loads(meta["pipeline.stats"])["chunks"] == table.num_rows == stats["chunks"]

    rows = table.to_pylist()
    vectors = np.array([r["embedding_vector"] for r in rows], dtype=np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The stored vector is the model's vector of the stored text.
    again = embedder.model.encode([rows[3]["text"]], normalize_embeddings=True)[0]
    assert np.allclose(vectors[3], again, atol=1e-4)
    per_doc = {}
    for r in rows:
        per_doc.setdefault(r["doc_id"], []).append(r["chunk_id"])
        m = r["metadata"]
        source = (small_corpus / m["path"]).read_text()
        assert source[m["char_start"] : m["char_end"]] == r["text"]
        assert m["title"].startswith("Document ") and m["heading_path"][0] == m["title"]
        assert 0 < m["token_count"] <= 254
        assert json.loads(m["front_matter"])["title"] == m["title"]
    assert all(ids == list(range(len(ids))) for ids in per_doc.values())
    assert len(per_doc) == 12
    assert sum(r["metadata"]["token_count"] for r in rows) == stats["tokens"]


def test_a_20_megabyte_document_is_chunked_whole_beside_small_ones(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus", documents=3)
    paragraph = "The history of all hitherto existing society is the history of class struggles. " * 60
    huge = "---\ntitle: Huge\n---\n\n# Huge\n\n" + "\n\n".join([paragraph] * 4200)
    huge += "\n\n" + "x" * 100_000 + "\n"  # one 'word' longer than any block limit
    (corpus / "huge.md").write_text(huge)
    assert (corpus / "huge.md").stat().st_size > 20_000_000
    output, stats = run(tmp_path, corpus, NullEmbedder(embedder))
    assert stats["rejected_documents"] == 0 and stats["embedded_documents"] == 4
    table = pq.read_table(OutputLayout.of(str(output)).shard(0), columns=["doc_id", "chunk_id", "metadata"])
    huge_rows = [m for m in table.column("metadata").to_pylist() if m["path"] == "huge.md"]
    assert len(huge_rows) > 20_000
    assert max(m["token_count"] for m in huge_rows) <= embedder.chunker.max_tokens
    assert huge_rows[-1]["char_end"] == len(huge.rstrip())
    for before, after in zip(huge_rows, huge_rows[1:]):
        assert not huge[before["char_end"] : after["char_start"]].strip(), "text lost between chunks"


def test_a_shard_whose_documents_are_all_bad_is_still_published_empty(tmp_path, embedder):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    add_bad_documents(corpus)
    for good in ("latin1.md", "broken-front-matter.md", "list-author.md"):
        (corpus / "bad" / good).unlink()
    output, stats = run(tmp_path, corpus, embedder)
    assert pq.read_table(OutputLayout.of(str(output)).shard(0)).num_rows == 0
    assert stats["rejected_documents"] == stats["documents"] == 3 and stats["chunks"] == 0
    assert len(open(OutputLayout.of(str(output)).rejects_of(0)).readlines()) == 3


def test_precision_recorded_is_the_precision_the_model_runs_in(tmp_path, embedder):
    """A checkpoint stored in fp16 must still run (and be recorded) as float32 on CPU:
    transformers loads weights in their stored dtype unless told otherwise."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.core.profiles import PROFILES
    from pipeline.core.embedder import Embedder

    source = embedder.model.tokenizer.name_or_path
    folder = tmp_path / "fp16-model"
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    loaded = Embedder(PROFILES["minilm"], str(folder), "cpu", 0, 16384, "float32")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.settings()["precision"] == "float32"
    texts = ["A spectre is haunting Europe.", "Workers of the world, unite!"]
    assert np.allclose(loaded.embed_texts(texts), embedder.embed_texts(texts), atol=1e-3)


def overlapping(monkeypatch, overlap):
    """Run the CPU model as if it left the CPU free (a GPU): reading and writing overlap it."""
    from pipeline.core.embedder import Embedder

    monkeypatch.setattr(Embedder, "runs_off_cpu", property(lambda self: overlap))


@pytest.fixture
def reader_pool_ends():
    from pipeline.core.reader_pool import close_readers

    yield
    close_readers()


@pytest.mark.parametrize("overlap, readers", [(True, 0), (False, 0), (True, 2)],
                         ids=["overlapped", "in-turn", "two-reader-processes"])
def test_a_shard_read_in_many_pieces_gives_the_rows_of_one_read_whole(tmp_path, small_corpus, embedder, monkeypatch,
                                                                      reader_pool_ends, overlap, readers):
    """Reading runs ahead of the model in pieces merged into groups, in this process or
    in reader processes; rows, vectors, rejects and progress must not depend on how the
    pieces fell or who read them."""
    from pipeline.core import reader_pool as reader_module, shard_job

    monkeypatch.setattr(reader_module, "BATCH_DOCUMENTS", 2)  # many batches, joined into groups

    add_bad_documents(small_corpus)
    whole_output, whole = run(tmp_path / "whole", small_corpus, embedder)
    overlapping(monkeypatch, overlap)
    monkeypatch.setattr(shard_job, "PIECE_TOKENS", 40)
    monkeypatch.setattr(shard_job, "GROUP_TOKENS", 80)
    reports = []
    output = tmp_path / "pieces" / "out"
    manifest = str(output / "manifest.parquet")
    write_manifest(str(small_corpus), "*.md", 100, manifest)
    pieces = run_shard(ShardJob(str(small_corpus), manifest, str(output), 1, readers=readers), 0, embedder,
                       report=lambda message, percent: reports.append(percent))

    assert pq.ParquetFile(OutputLayout.of(str(output)).shard(0)).num_row_groups > 1  # really in several groups (how many: what was ready)
    expected, got = pq.read_table(OutputLayout.of(str(whole_output)).shard(0)), pq.read_table(OutputLayout.of(str(output)).shard(0))
    assert got.column("doc_id").to_pylist() == expected.column("doc_id").to_pylist()
    assert got.column("text").to_pylist() == expected.column("text").to_pylist()
    assert np.allclose(np.array(got.column("embedding_vector").to_pylist()),
                       np.array(expected.column("embedding_vector").to_pylist()), atol=1e-5)
    assert open(OutputLayout.of(str(output)).rejects_of(0)).read() == open(OutputLayout.of(str(whole_output)).rejects_of(0)).read()
    assert {k: pieces[k] for k in ("chunks", "tokens", "rejected_documents", "front_matter_errors")} == \
        {k: whole[k] for k in ("chunks", "tokens", "rejected_documents", "front_matter_errors")}
    assert reports[-1] == 100


def test_a_reader_process_that_dies_fails_its_shard_and_the_next_shard_gets_new_readers(tmp_path, small_corpus, embedder,
                                                                                      reader_pool_ends):
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from pipeline.core import reader_pool as readers

    run(tmp_path / "first", small_corpus, embedder, readers=1)
    [pool] = readers._pools.values()
    for process in list(pool._processes.values()):  # killed, as by the kernel's OOM killer
        os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        run(tmp_path / "second", small_corpus, embedder, readers=1)
    assert not (tmp_path / "second" / "out" / "shards").exists() or not any((tmp_path / "second" / "out" / "shards").iterdir())
    output, stats = run(tmp_path / "third", small_corpus, embedder, readers=1)
    assert stats["embedded_documents"] == stats["documents"] > 0 and (output / "shards" / "shard-000000.parquet").exists()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "in-turn"])
def test_a_failing_group_write_fails_the_shard_and_publishes_nothing(tmp_path, small_corpus, embedder, monkeypatch, overlap):
    from pipeline.core import shard_job

    overlapping(monkeypatch, overlap)

    monkeypatch.setattr(shard_job, "PIECE_TOKENS", 40)
    monkeypatch.setattr(shard_job, "GROUP_TOKENS", 80)
    writes = []

    def write_then_fail(self, rows, vectors):
        writes.append(len(rows))
        if len(writes) == 3:
            raise OSError("no space left on device")
        return original(self, rows, vectors)

    original = shard_job.ShardWriter.write
    monkeypatch.setattr(shard_job.ShardWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="no space left"):
        run(tmp_path, small_corpus, embedder)
    assert not (tmp_path / "out" / "shards").exists() or not list((tmp_path / "out" / "shards").iterdir())


def test_progress_counts_documents_as_their_chunks_are_embedded_not_only_when_written(tmp_path, embedder, monkeypatch):
    """On a CPU a shard is often one group, written at the end: the web view must still
    see documents, a percentage and an ETA move while the model works through it."""
    import functools

    from pipeline.core import shard_job
    from pipeline.core.progress import Progress

    monkeypatch.setattr(shard_job, "Progress", functools.partial(Progress, interval=0))
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=400)
    manifest = str(tmp_path / "out" / "manifest.parquet")
    write_manifest(str(corpus), "*.md", 100, manifest)
    reports = []
    monkeypatch.setattr(embedder, "batch_tokens", 1024)  # several batches in the shard's one group
    run_shard(ShardJob(str(corpus), manifest, str(tmp_path / "out"), 3), 0, embedder, report=lambda m, p: reports.append((m, p)))
    percents = [percent for _, percent in reports]
    assert percents == sorted(percents) and percents[-1] == 100
    moving = [(m, p) for m, p in reports if 0 < p < 100]
    assert len(moving) >= 3, reports
    assert all(m.startswith("shard 0 of 3: ") and "ETA unknown" not in m for m, _ in moving)
    assert reports[-1][0].startswith("shard 0 of 3: 10/10 documents, ETA 0m00s\n")
