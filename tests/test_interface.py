"""The public Python API of docs/api.md, driven as a user's code would: from pipeline import …"""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from fake_runpod import GPU_TYPES, FakeRunpod
from helpers import ROOT, shard_failing, write_corpus
from pipeline import EmbeddingInterface, PodSettings, RunFailed, RunpodOrchestrator, read_shard
from pipeline.core.corpus import doc_id_for
from pipeline.errors import PipelineError
from pipeline.output.verify import verify_output

SETTINGS = dict(docs_per_shard=4, device="cpu", precision="float32", batch_tokens=16384)


@pytest.fixture
def corpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=120)
    (corpus / "part-1" / "binary.md").write_bytes(b"\x00\x01" * 100)
    return corpus


def interface(corpus, output, **settings) -> EmbeddingInterface:
    return EmbeddingInterface(str(output), corpus=str(corpus), **{**SETTINGS, **settings})


def rows_by_chunk(shard: Path) -> dict:
    table = pq.read_table(shard).to_pylist()
    return {(r["doc_id"], r["chunk_id"]): r for r in table}


def test_a_run_from_nothing_to_finished_through_checkpoints(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    before = api.get_checkpoint()
    assert (before.total_shards, before.done, before.missing, before.finished) == (None, (), (), False)

    after = api.resume_from_checkpoint(before)
    assert (after.total_shards, after.done, after.missing, after.finished) == (3, (0, 1, 2), (), True)
    assert after == api.get_checkpoint()
    assert verify_output(api.output).ok
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["documents"] == 11


def test_a_lost_shard_shows_in_the_checkpoint_and_resuming_makes_only_it(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    api.resume_from_checkpoint(api.get_checkpoint())
    shards = tmp_path / "out" / "shards"
    (shards / "shard-000001.parquet").unlink()
    (tmp_path / "out" / "_SUCCESS.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet")}

    checkpoint = api.get_checkpoint()
    assert (checkpoint.done, checkpoint.missing, checkpoint.finished) == ((0, 2), (1,), False)
    saved = json.dumps(dataclasses.asdict(checkpoint))  # a checkpoint kept as JSON between processes
    resumed = api.resume_from_checkpoint(json.loads(saved))
    assert (resumed.done, resumed.finished) == ((0, 1, 2), True)
    assert {name: (shards / name).stat().st_mtime_ns for name in kept} == kept
    assert verify_output(api.output).ok


def test_a_failing_shard_leaves_the_others_and_names_what_is_missing(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    with shard_failing(2), pytest.raises(RunFailed, match=r"1 shard\(s\) missing \(2\)") as failed:
        api.resume_from_checkpoint(api.get_checkpoint())
    assert (failed.value.checkpoint.done, failed.value.checkpoint.missing) == ((0, 1), (2,))

    assert api.resume_from_checkpoint(failed.value.checkpoint).finished



def test_checkpoints_and_resume_on_a_bucket_output(tmp_path, corpus, gcs_bucket):
    api = interface(corpus, f"{gcs_bucket.url}/out")
    assert api.get_checkpoint().total_shards is None
    finished = api.resume_from_checkpoint(api.get_checkpoint())
    assert (finished.done, finished.finished) == ((0, 1, 2), True)
    assert verify_output(api.output).ok


def test_a_shard_lost_after_the_summary_is_not_called_finished_and_resume_remakes_it(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    api.resume_from_checkpoint(api.get_checkpoint())
    (tmp_path / "out" / "shards" / "shard-000001.parquet").unlink()  # _SUCCESS.json stays

    checkpoint = api.get_checkpoint()
    assert (checkpoint.missing, checkpoint.finished) == ((1,), False)
    assert api.resume_from_checkpoint(checkpoint).finished
    assert verify_output(api.output).ok


def test_new_documents_are_added_on_resume_when_asked(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out", add_new_documents=True)
    assert api.resume_from_checkpoint(api.get_checkpoint()).total_shards == 3
    unchanged = api.resume_from_checkpoint(api.get_checkpoint())  # nothing new: still finished
    assert (unchanged.total_shards, unchanged.finished) == (3, True)

    for name in ("new-1.md", "new-2.md"):
        (corpus / name).write_text(f"# {name}\n\nA document added after the first run.\n")
    grown = api.resume_from_checkpoint(api.get_checkpoint())
    assert (grown.total_shards, grown.done, grown.finished) == (4, (0, 1, 2, 3), True)
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["documents"] == 13
    assert verify_output(api.output).ok


def test_a_run_that_cannot_start_says_why(tmp_path):
    api = interface(tmp_path / "no-such-corpus", tmp_path / "out")
    with pytest.raises(RunFailed, match="CorpusManifest: .*no-such-corpus"):
        api.resume_from_checkpoint(api.get_checkpoint())

def test_a_checkpoint_of_another_output_or_other_settings_is_refused(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    other_output = interface(corpus, tmp_path / "elsewhere").get_checkpoint()
    with pytest.raises(PipelineError, match="another run"):
        api.resume_from_checkpoint(other_output)
    other_shards = interface(corpus, tmp_path / "out", docs_per_shard=5).get_checkpoint()
    with pytest.raises(PipelineError, match="another run"):
        api.resume_from_checkpoint(other_shards)
    assert not (tmp_path / "out" / "shards").exists()
    api.resume_from_checkpoint(api.get_checkpoint())
    with pytest.raises(PipelineError, match="docs_per_shard"):  # opened with the wrong shard size
        interface(corpus, tmp_path / "out", docs_per_shard=5).get_checkpoint()


def test_generated_embeddings_are_the_vectors_the_pipeline_stored(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    api.resume_from_checkpoint(api.get_checkpoint())
    table = read_shard(f"{api.output}/shards/shard-000000.parquet")
    texts = table["text"].to_pylist()
    stored = np.asarray(table["embedding_vector"].to_pylist(), dtype=np.float32)

    vectors = api.generate_embeddings(texts)
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vectors, stored, atol=2e-5)
    with pytest.raises(PipelineError, match="list of texts"):
        api.generate_embeddings("one string")
    with pytest.raises(PipelineError, match="not NoneType"):
        api.generate_embeddings(["a text", None])
    assert api.generate_embeddings([]).shape == (0, 384)


def test_batch_process_embeds_chosen_files_as_the_corpus_run_does(tmp_path, corpus):
    api = interface(corpus, tmp_path / "out")
    api.resume_from_checkpoint(api.get_checkpoint())
    chosen = [corpus / "part-2" / "doc-005.md", corpus / "part-0" / "doc-003.md", corpus / "part-1" / "binary.md"]

    shard = api.batch_process(chosen)
    assert re.fullmatch(rf"{re.escape(api.output)}/batches/batch-[0-9a-f]{{16}}/shards/shard-000000\.parquet", shard)
    batch_output = shard.rsplit("/shards/", 1)[0]
    assert verify_output(batch_output).ok
    rows = rows_by_chunk(Path(shard))
    assert {doc for doc, _ in rows} == {doc_id_for("part-0/doc-003.md"), doc_id_for("part-2/doc-005.md")}
    rejected = [json.loads(line) for line in Path(batch_output, "rejects", "shard-000000.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in rejected] == [("part-1/binary.md", "binary")]

    corpus_rows = {}
    for path in sorted((tmp_path / "out" / "shards").glob("*.parquet")):
        corpus_rows.update(rows_by_chunk(path))
    for key, row in rows.items():  # same ids, chunks and vectors as the corpus run made
        assert row["text"] == corpus_rows[key]["text"]
        np.testing.assert_allclose(row["embedding_vector"], corpus_rows[key]["embedding_vector"], atol=2e-5)

    made = Path(shard).stat().st_mtime_ns
    again = interface(corpus, tmp_path / "out")
    again.embedder = lambda: pytest.fail("the model was loaded for a batch already made")
    assert again.batch_process(list(reversed(chosen))) == shard  # the same files: the shard already made
    assert Path(shard).stat().st_mtime_ns == made
    chosen[0].write_text(chosen[0].read_text() + "\nA new last paragraph about volcanoes.\n")
    assert api.batch_process(chosen) != shard  # changed contents: a new batch


def test_batch_process_stores_vectors_as_its_settings_say_and_keys_its_batches_by_them(tmp_path, corpus):
    chosen = [corpus / "part-0" / "doc-003.md"]
    plain = interface(corpus, tmp_path / "out").batch_process(chosen)
    half = interface(corpus, tmp_path / "out", vector_dtype="float16", compact_columns="binary").batch_process(chosen)
    assert half != plain  # not the float32 batch made before
    settings = {k.decode(): v.decode() for k, v in pq.read_schema(half).metadata.items()}
    assert settings["pipeline.vector_dtype"] == "float16" and settings["pipeline.compact_columns"] == "binary"
    assert str(pq.read_schema(half).field("embedding_vector").type.value_type) == "halffloat"
    assert verify_output(half.rsplit("/shards/", 1)[0]).ok


def test_batch_process_outside_the_corpus_and_bad_paths(tmp_path, corpus):
    api = EmbeddingInterface(tmp_path / "out", corpus=corpus, **SETTINGS)  # paths as Path
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.md").write_text("# Bees\n\nBees make honey from nectar.\n")
    (loose / "b.md").write_text("# Tides\n\nThe moon pulls the oceans.\n")
    shard = api.batch_process([loose / "a.md", str(loose / "b.md")])
    assert sorted(pq.read_table(shard)["metadata"].combine_chunks().field("path").to_pylist()) == ["a.md", "b.md"]
    with pytest.raises(PipelineError, match="not a file"):
        api.batch_process([loose / "missing.md"])
    with pytest.raises(PipelineError, match="in a bucket"):
        api.batch_process(["gs://bucket/doc.md"])
    with pytest.raises(PipelineError, match="at least one file"):
        api.batch_process([])


def test_the_orchestrator_is_public_and_keeps_its_ledger_in_the_output(tmp_path, monkeypatch):
    fake = FakeRunpod()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", fake.url)
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        pods = RunpodOrchestrator(PodSettings(image="registry.local/embedding:abc123", poll_interval=0.05,
                                              api_max_wait=0.05), tmp_path / "out", api_key=fake.api_key)
        pod_id = pods.start_pod("NVIDIA RTX A6000")
        assert pods.wait_until_running(pod_id)["runtime"]
        assert pods.get_pod_status(pod_id)["desiredStatus"] == "RUNNING"
        pods.stop_pod(pod_id)
        assert pods.get_pod_status(pod_id)["desiredStatus"] == "EXITED"
        pods.terminate_pod(pod_id)
        assert pods.get_pod_status(pod_id) is None and fake.running_pods() == []
        record = json.loads((tmp_path / "out" / "_runs" / "pods" / f"{pod_id}.json").read_text())
        assert record["gpu_type"] == "NVIDIA RTX A6000" and record["end_reason"] == "done"
        assert record["price_per_hour"] == GPU_TYPES["NVIDIA RTX A6000"]["communityPrice"]
    finally:
        fake.stop()


def test_every_public_name_is_documented_in_docs_api():
    documented = (ROOT / "docs" / "api.md").read_text()
    public = set(pipeline.__all__) - {"CorpusManifest", "EmbedAll", "EmbedShard", "RunpodEmbedAll"}  # the CLI's tasks
    methods = {f"{cls.__name__}.{name}" for cls in (EmbeddingInterface, RunpodOrchestrator)
               for name in vars(cls) if not name.startswith("_") and callable(getattr(cls, name))}
    missing = [name for name in sorted(public) if f"`{name}" not in documented]
    missing += [name for name in sorted(methods) if f"{name.split('.')[1]}(" not in documented]
    assert missing == [], f"not in docs/api.md: {missing}"
