"""A corpus that gains documents between runs: a resumed run keeps its manifest and says
how many documents it leaves out; ``--add-new-documents`` embeds them as new shards and
leaves the finished ones as they are."""

import json

import luigi
import pyarrow.parquet as pq

from helpers import write_corpus
from pipeline import EmbedAll
from pipeline.core.corpus import write_manifest
from pipeline.core.manifest_growth import add_new_documents, documents_not_in_manifest
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.output.verify import verify_output


def add_documents(corpus, names):
    for name in names:
        (corpus / name).write_text(f"---\ntitle: {name}\n---\n\n# {name}\n\nA document added later, called {name}.\n")


def small_run(tmp_path):
    """A 4-document corpus in shards of 2, and EmbedAll's settings for it (the session's
    model settings, so the worker reuses the loaded model)."""
    corpus = write_corpus(tmp_path / "corpus", documents=4, words=60)
    output = tmp_path / "out"
    return corpus, output, dict(corpus=str(corpus), output=str(output), docs_per_shard=2, device="cpu",
                                batch_tokens=16384, precision="float32")


def finished_run(tmp_path):
    corpus, output, settings = small_run(tmp_path)
    assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    return corpus, output, settings


def test_new_documents_are_found_in_one_pass_and_appended_as_new_shards(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=5, words=40)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(str(corpus), "*.md", 2, manifest)
    assert list(documents_not_in_manifest(str(corpus), "*.md", manifest)) == []
    add_documents(corpus, ["a-first.md", "z-last.md", "zz-after.md"])
    before = pq.read_table(manifest)
    assert [d.relative for d in documents_not_in_manifest(str(corpus), "*.md", manifest)] == ["a-first.md", "z-last.md", "zz-after.md"]

    assert add_new_documents(str(corpus), "*.md", manifest) == 3
    after = pq.read_table(manifest)
    assert after.slice(0, before.num_rows).select(before.column_names).equals(before), "the rows already there moved"
    assert after.slice(before.num_rows)["generation"].to_pylist() == [1, 1, 1]
    assert after.slice(before.num_rows).select(["path", "shard"]).to_pylist() == [
        {"path": "a-first.md", "shard": 3}, {"path": "z-last.md", "shard": 3}, {"path": "zz-after.md", "shard": 4}]
    meta = pq.read_metadata(manifest).metadata
    assert meta[b"pipeline.documents"] == b"8" and meta[b"pipeline.shards"] == b"5" and b"pipeline.extended_at" in meta
    assert add_new_documents(str(corpus), "*.md", manifest) == 0


def test_a_resumed_run_keeps_its_manifest_without_listing_the_corpus_again_and_the_option_embeds_the_new(
        tmp_path, embedder, monkeypatch):
    """At the end of a run not asked to follow the corpus, nothing lists it again (at 10
    million documents, a second full listing); --add-new-documents takes the new ones."""
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=80)
    output = tmp_path / "out"
    # The session's model settings, so the worker reuses the loaded model.
    settings = dict(corpus=str(corpus), output=str(output), docs_per_shard=2, device="cpu", batch_tokens=16384,
                    precision="float32")
    manifest = str(output / "manifest.parquet")
    write_manifest(str(corpus), "*.md", 2, manifest)
    run_shard(ShardJob(str(corpus), manifest, str(output), 3), 0, embedder)
    add_documents(corpus, ["a-first.md", "z-last.md", "zz-after.md"])  # after the manifest, mid-run

    def listed_again(*args):
        raise AssertionError("the corpus was listed again at the end of a run that does not follow it")

    with monkeypatch.context() as patched:
        patched.setattr("pipeline.tasks.documents_not_in_manifest", listed_again)
        assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["shards"] == 3 and summary["documents"] == 6 and "documents_not_in_manifest" not in summary
    assert verify_output(str(output)).ok
    finished = {p.name: p.read_bytes() for p in (output / "shards").glob("*.parquet")}

    assert luigi.build([EmbedAll(**settings, add_new_documents=True)], local_scheduler=True, log_level="WARNING")
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["shards"] == 5 and summary["documents"] == 9 and summary["documents_not_in_manifest"] == 0
    assert all((output / "shards" / name).read_bytes() == data for name, data in finished.items()), "a finished shard changed"
    new_paths = {row["metadata"]["path"] for shard in (3, 4)
                 for row in pq.read_table(output / "shards" / f"shard-00000{shard}.parquet").to_pylist()}
    assert new_paths == {"a-first.md", "z-last.md", "zz-after.md"}
    assert verify_output(str(output)).ok
    assert EmbedAll(**settings).complete()


def test_a_grown_manifest_is_finished_by_a_plain_rerun_after_a_kill(tmp_path, embedder):
    """Killed after the manifest grew: the old summary is gone, so a rerun without the
    option (or a pod's run) makes the new shards instead of calling the output done."""
    corpus, output, settings = finished_run(tmp_path)
    add_documents(corpus, ["new-one.md", "new-two.md"])

    assert add_new_documents(str(corpus), "*.md", str(output / "manifest.parquet")) == 2  # then killed
    assert not (output / "_SUCCESS.json").exists() and not EmbedAll(**settings).complete()
    assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    assert json.loads((output / "_SUCCESS.json").read_text())["documents"] == 6
    assert verify_output(str(output)).ok


def test_a_manifest_grown_during_a_run_is_finished_by_that_run(tmp_path, embedder):
    """Another worker grows the manifest while this run embeds: the run makes the new
    shards too, and its summary counts the manifest as it is at the end."""
    import pipeline.tasks

    corpus, output, settings = small_run(tmp_path)
    real_run_shard = pipeline.tasks.run_shard

    def growing_on_the_last_shard(job, shard, *args, **kwargs):
        if shard == 1 and not (output / "grown").exists():
            (output / "grown").touch()
            add_documents(corpus, ["new-one.md", "new-two.md", "new-three.md"])
            assert add_new_documents(job.corpus, "*.md", job.manifest) == 3
        return real_run_shard(job, shard, *args, **kwargs)

    pipeline.tasks.run_shard = growing_on_the_last_shard
    try:
        assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    finally:
        pipeline.tasks.run_shard = real_run_shard
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert (summary["shards"], summary["documents"]) == (4, 7)
    assert verify_output(str(output)).ok and EmbedAll(**settings).complete()


def test_a_summary_that_counts_fewer_shards_than_the_manifest_is_not_done(tmp_path, embedder):
    corpus, output, settings = finished_run(tmp_path)
    summary = (output / "_SUCCESS.json").read_text()
    add_documents(corpus, ["new-one.md"])
    assert add_new_documents(str(corpus), "*.md", str(output / "manifest.parquet")) == 1
    (output / "_SUCCESS.json").write_text(summary)  # a stale summary, written back by a run that started earlier
    assert not EmbedAll(**settings).complete()
    assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    assert json.loads((output / "_SUCCESS.json").read_text())["shards"] == 3 and verify_output(str(output)).ok


def test_add_new_documents_with_another_corpus_is_refused_before_the_manifest_grows(tmp_path, embedder):
    corpus, output, settings = finished_run(tmp_path)
    manifest, summary = (output / "manifest.parquet").read_bytes(), (output / "_SUCCESS.json").read_bytes()
    foreign = write_corpus(tmp_path / "foreign", documents=3, words=30, seed=99)

    assert not luigi.build([EmbedAll(**{**settings, "corpus": str(foreign)}, add_new_documents=True)],
                           local_scheduler=True, log_level="WARNING")
    assert (output / "manifest.parquet").read_bytes() == manifest and (output / "_SUCCESS.json").read_bytes() == summary