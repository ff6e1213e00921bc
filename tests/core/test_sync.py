"""``--sync``: an output follows a corpus that changes (pipeline/core/sync.py,
pipeline/core/generations.py). A corpus is embedded, then edited three times (documents
added, changed, moved and deleted, one replaced by unreadable bytes) and synced; after
each sync the output verifies, its current view equals a fresh full run over the edited
corpus, only the changed documents were embedded, and no shard file was rewritten."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import EDITS, write_corpus
from pipeline.core import sync
from pipeline.core.corpus import doc_id_for, list_documents, manifest_info, write_manifest
from pipeline.core.generations import CHANGE_LOG_SCHEMA
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.core.sync import describe_sync, last_sync, read_change_log, read_manifest, sync_output
from pipeline.output.layout import OutputLayout
from pipeline.output.status import format_status, run_status
from pipeline.output.read_back import embedding_stats, read_shard, stream_embeddings
from pipeline.output.summary import run_summary
from pipeline.output.verify import format_verdict, verify_output

PER_SHARD = 4


def embed_missing_shards(corpus, output, embedder, skip_duplicates=False) -> list[int]:
    """Run every shard without a file (as EmbedAll would); the shards it ran."""
    where = OutputLayout.of(output)
    total = int(pq.read_metadata(where.manifest).metadata[b"pipeline.shards"])
    ran = [shard for shard in range(total) if not (output / "shards" / f"shard-{shard:06d}.parquet").exists()]
    for shard in ran:
        run_shard(ShardJob(str(corpus), where.manifest, str(output), total, skip_duplicates=skip_duplicates), shard, embedder)
    (output / "_SUCCESS.json").write_text(json.dumps(run_summary(str(output), total, {})))
    return ran


def full_run(corpus, output, embedder, docs_per_shard=PER_SHARD, skip_duplicates=False):
    write_manifest(str(corpus), "*.md", docs_per_shard, str(output / "manifest.parquet"))
    embed_missing_shards(corpus, output, embedder, skip_duplicates)


def current_view(output) -> dict:
    """{(doc_id, chunk_id): (path, text, vector)} of what a reader gets."""
    rows = {}
    for batch in stream_embeddings(str(output)):
        for i, doc_id in enumerate(batch.doc_ids):
            key = (doc_id, int(batch.chunk_ids[i]))
            assert key not in rows, f"{key} read twice"
            rows[key] = (batch.metadata[i]["path"], batch.texts[i], batch.vectors[i])
    return rows


def assert_same_view(synced, fresh):
    got, expected = current_view(synced), current_view(fresh)
    assert got.keys() == expected.keys()
    for key, (path, text, vector) in expected.items():
        assert got[key][:2] == (path, text), key
        assert np.allclose(got[key][2], vector, atol=1e-5), key


def shard_files(output) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in (output / "shards").glob("*.parquet")}


EXPECTED = [
    {"changed": 3, "moved": 1, "deleted": 1, "added": 1},
    {"changed": 3, "moved": 1, "added": 1},
    {"deleted": 1, "moved": 1, "changed": 1},
]


def test_three_syncs_each_equal_a_fresh_run_and_embed_only_what_changed(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=120)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    for generation, (edit, expected) in enumerate(zip(EDITS, EXPECTED), start=1):
        before = shard_files(output)
        edit(corpus)
        result = sync_output(str(corpus), "*.md", str(output))
        assert (result.generation, dict(result.counts)) == (generation, expected)
        assert not (output / "_SUCCESS.json").exists(), "a synced output with shards to make looked finished"
        ran = embed_missing_shards(corpus, output, embedder)

        assert {name: shard_files(output)[name] for name in before} == before, "a finished shard was rewritten"
        embedded = sum(json.loads(pq.read_metadata(output / "shards" / f"shard-{n:06d}.parquet").metadata[b"pipeline.stats"])
                       ["documents"] for n in ran)
        assert embedded == expected.get("added", 0) + expected.get("changed", 0), "more was embedded than changed"

        verdict = verify_output(str(output))
        assert verdict.ok, format_verdict(str(output), verdict)
        fresh = tmp_path / f"fresh-{generation}"
        full_run(corpus, fresh, embedder)
        assert_same_view(output, fresh)
        assert embedding_stats(str(output))["count"] == embedding_stats(str(fresh))["count"]

    assert sync_output(str(corpus), "*.md", str(output)).changed_anything is False


def test_the_change_log_says_what_each_document_became(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    EDITS[0](corpus)
    sync_output(str(corpus), "*.md", str(output))
    log = read_change_log(str(OutputLayout.of(output).change_log(1)))
    assert log.schema.equals(CHANGE_LOG_SCHEMA)
    rows = {row["path"]: row for row in log.to_pylist()}
    assert rows["part-0/doc-000.md"]["action"] == "changed" and rows["part-0/doc-000.md"]["old_shard"] == 0
    assert rows["part-0/doc-000.md"]["new_shard"] == 3 == rows["part-1/new-a.md"]["new_shard"]
    moved = rows["part-2/doc-003-moved.md"]
    assert (moved["action"], moved["old_path"], moved["new_shard"]) == ("moved", "part-0/doc-003.md", moved["old_shard"])
    assert moved["embedded_doc_id"] != moved["doc_id"]
    assert rows["part-0/doc-006.md"]["action"] == "deleted" and rows["part-0/doc-006.md"]["new_shard"] is None
    assert len({row["time"] for row in rows.values()}) == 1


def test_a_moved_document_is_read_under_its_new_id_and_path_and_history_keeps_the_old(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    (corpus / "part-0" / "doc-003.md").rename(corpus / "part-0" / "renamed.md")
    assert dict(sync_output(str(corpus), "*.md", str(output)).counts) == {"moved": 1}
    assert embed_missing_shards(corpus, output, embedder) == [], "a move embedded something"
    shard = str(output / "shards" / "shard-000000.parquet")
    now, stored = read_shard(shard), read_shard(shard, history=True)
    assert now.num_rows == stored.num_rows
    paths_now = {m["path"] for m in now["metadata"].to_pylist()}
    assert "part-0/renamed.md" in paths_now and "part-0/doc-003.md" not in paths_now
    assert "part-0/doc-003.md" in {m["path"] for m in stored["metadata"].to_pylist()}
    assert np.array_equal(np.stack(now["embedding_vector"].to_numpy(zero_copy_only=False)),
                          np.stack(stored["embedding_vector"].to_numpy(zero_copy_only=False)))
    from pipeline.output.search import search

    moved_text = next(row["text"] for row in now.to_pylist() if row["metadata"]["path"] == "part-0/renamed.md")
    [best] = search(str(output), moved_text, k=1, embedder=embedder)
    assert (best["path"], best["doc_id"]) == ("part-0/renamed.md", doc_id_for("part-0/renamed.md"))


def test_an_output_made_before_syncs_reads_verifies_and_syncs(tmp_path, embedder):
    """A manifest without the generation columns: every row current; the first sync adds them."""
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    assert "generation" not in pq.read_schema(output / "manifest.parquet").names
    assert verify_output(str(output)).ok and len(current_view(output)) > 0
    (corpus / "part-1" / "doc-001.md").unlink()
    assert dict(sync_output(str(corpus), "*.md", str(output)).counts) == {"deleted": 1}
    embed_missing_shards(corpus, output, embedder)
    assert verify_output(str(output)).ok
    assert not any(doc_path == "part-1/doc-001.md" for doc_path, _, _ in current_view(output).values())


def test_verify_finds_a_change_log_that_does_not_match_or_was_never_applied(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    (corpus / "part-1" / "doc-001.md").unlink()
    sync_output(str(corpus), "*.md", str(output))
    embed_missing_shards(corpus, output, embedder)
    where = OutputLayout.of(output)
    log = pq.read_table(where.change_log(1))
    pq.write_table(log.slice(0, 0), where.change_log(1))
    assert any("change log of generation 1: does not match" in p for p in verify_output(str(output)).problems)
    pq.write_table(log, where.change_log(1))
    pq.write_table(log, where.change_log(2))
    assert any("generation 2: published but not applied" in p for p in verify_output(str(output)).problems)


def test_a_sync_lists_the_corpus_once_whether_or_not_anything_changed(tmp_path, embedder, monkeypatch):
    """At 10 million documents a listing is 10,000 list calls, or a read of every byte of a
    local corpus: a sync that published its change lists nothing more to look for changes
    made meanwhile (the next sync takes them)."""
    corpus = write_corpus(tmp_path / "corpus", documents=8, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    listings = []
    real = sync.list_documents
    monkeypatch.setattr(sync, "list_documents", lambda *args: listings.append(args) or real(*args))
    EDITS[0](corpus)
    assert sync_output(str(corpus), "*.md", str(output)).changed_anything
    assert len(listings) == 1
    assert not sync_output(str(corpus), "*.md", str(output)).changed_anything
    assert len(listings) == 2


def test_a_sync_cut_short_after_its_change_log_is_finished_by_the_next(tmp_path, embedder):
    """The change log is the commit point: a sync killed after publishing it (the manifest
    not yet) leaves the log alone in the output; the rerun applies it, then finds nothing
    more, and the output equals one synced without a break."""
    corpus = write_corpus(tmp_path / "corpus", documents=8, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(output, uninterrupted)
    EDITS[0](corpus)
    sync_output(str(corpus), "*.md", str(uninterrupted))
    changes = output / "changes"
    changes.mkdir()
    shutil.copy(OutputLayout.of(uninterrupted).change_log(1), changes)  # what the killed sync left
    (output / "_SUCCESS.json").unlink()
    assert any("not applied" in problem for problem in verify_output(str(output)).problems)

    result = sync_output(str(corpus), "*.md", str(output))
    assert (result.generation, sum(result.counts.values())) == (1, 6)
    for finished in (output, uninterrupted):
        embed_missing_shards(corpus, finished, embedder)
        assert verify_output(str(finished)).ok
    assert_same_view(output, uninterrupted)
    assert read_manifest(str(output / "manifest.parquet")).equals(read_manifest(str(uninterrupted / "manifest.parquet")))
    assert read_change_log(OutputLayout.of(output).change_log(1)).equals(
        read_change_log(OutputLayout.of(uninterrupted).change_log(1)))


def test_shards_of_a_generation_not_yet_made_then_synced_again(tmp_path, embedder):
    """A sync, then more edits before its shards were made (a kill, or a user in a hurry):
    the second sync supersedes rows no shard has embedded yet, and a move out of a shard
    not yet made is a delete and an add (nothing is stored to re-key)."""
    corpus = write_corpus(tmp_path / "corpus", documents=8, words=60)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    EDITS[0](corpus)
    sync_output(str(corpus), "*.md", str(output))
    (corpus / "part-1" / "new-a.md").rename(corpus / "part-1" / "new-a-moved.md")
    (corpus / "part-0" / "doc-000.md").write_text("# Again\n\nChanged a second time.\n")
    result = sync_output(str(corpus), "*.md", str(output))
    assert dict(result.counts) == {"added": 1, "deleted": 1, "changed": 1}
    embed_missing_shards(corpus, output, embedder)
    verdict = verify_output(str(output))
    assert verdict.ok, format_verdict(str(output), verdict)
    fresh = tmp_path / "fresh"
    full_run(corpus, fresh, embedder)
    assert_same_view(output, fresh)


def write_copies(corpus, contents: dict[str, str]) -> None:
    """One document per name, of the given content (the same content: the same bytes)."""
    for name, content in contents.items():
        (corpus / f"{name}.md").write_text(f"# Document {content}\n\nThe text of {content}, " + "and more words " * 40)


def embedded_contents(output, corpus) -> dict[str, tuple[str, list]]:
    """{content_hash: (the path holding it, [(chunk id, text, vector)])} of the current view,
    checking that no content is embedded under two documents."""
    paths = {listed.relative: listed.content_hash for listed in list_documents(str(corpus), "*.md")}
    found: dict[str, tuple[str, list]] = {}
    for (doc_id, chunk_id), (path, text, vector) in sorted(current_view(output).items(), key=lambda item: item[0]):
        holder, chunks = found.setdefault(paths[path], (path, []))
        assert holder == path, f"content of {path} embedded twice (also as {holder})"
        chunks.append((chunk_id, text, vector))
    return found


def test_sync_with_skip_duplicates_embeds_a_copy_again_when_its_holder_changes_or_goes(tmp_path, embedder):
    """``--skip-duplicates`` embeds each content once, for its first document. A sync that
    changes or deletes that first document lists its current copies as changed, so they
    are embedded again; a holder that moves keeps holding; a copy's move whose content
    lost its holder is a delete and an add. After each sync every current content is
    embedded exactly once, as a fresh ``--skip-duplicates`` run embeds it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_copies(corpus, {"a": "X", "b": "Y", "c": "X", "d": "Z", "e": "Y", "f": "X"})
    output = tmp_path / "out"
    full_run(corpus, output, embedder, docs_per_shard=2, skip_duplicates=True)

    def sync1():  # X's holder a deleted, a copy of X moves (pairs with a: a's rows move); Y's holder b changed
        (corpus / "a.md").unlink()
        (corpus / "f.md").rename(corpus / "g.md")
        write_copies(corpus, {"b": "W", "h": "Z"})

    def sync2():  # a copy of X moves (its holder stays); Z's holder d changes into a copy of Y
        (corpus / "c.md").rename(corpus / "k.md")
        write_copies(corpus, {"d": "Y"})

    def sync3():  # Y's holder e deleted and its copy d moved: the move re-keys nothing embedded, so d is added
        (corpus / "e.md").unlink()
        (corpus / "d.md").rename(corpus / "q.md")

    steps = [(sync1, {"moved": 1, "deleted": 1, "changed": 2, "added": 1}, 2), (sync2, {"moved": 1, "changed": 2}, 1),
             (sync3, {"deleted": 2, "added": 1}, 1)]
    for generation, (edit, expected, embedded_now) in enumerate(steps, start=1):
        edit()
        result = sync_output(str(corpus), "*.md", str(output), skip_duplicates=True)
        assert dict(result.counts) == expected
        ran = embed_missing_shards(corpus, output, embedder, skip_duplicates=True)
        embedded = sum(json.loads(pq.read_metadata(output / "shards" / f"shard-{n:06d}.parquet").metadata[b"pipeline.stats"])
                       ["embedded_documents"] for n in ran)
        assert embedded == embedded_now, "only the changed contents are embedded"
        verdict = verify_output(str(output))
        assert verdict.ok, format_verdict(str(output), verdict)

        fresh = tmp_path / f"fresh-{generation}"
        full_run(corpus, fresh, embedder, docs_per_shard=2, skip_duplicates=True)
        synced, expected_contents = embedded_contents(output, corpus), embedded_contents(fresh, corpus)
        assert synced.keys() == expected_contents.keys() == {c.content_hash for c in list_documents(str(corpus), "*.md")}
        for content_hash, (_, chunks) in expected_contents.items():
            got = synced[content_hash][1]
            assert [(i, text) for i, text, _ in got] == [(i, text) for i, text, _ in chunks]
            assert all(np.allclose(a[2], b[2], atol=1e-5) for a, b in zip(got, chunks))


def test_verify_finds_a_copy_whose_holder_a_sync_left_unembedded(tmp_path, embedder):
    """A sync that ignores ``--skip-duplicates`` (as one made before it was followed did)
    deletes the first copy and leaves the others rejected: verify says so."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_copies(corpus, {"a": "X", "b": "X"})
    output = tmp_path / "out"
    full_run(corpus, output, embedder, docs_per_shard=2, skip_duplicates=True)
    (corpus / "a.md").unlink()
    assert dict(sync_output(str(corpus), "*.md", str(output)).counts) == {"deleted": 1}
    assert embed_missing_shards(corpus, output, embedder, skip_duplicates=True) == []
    verdict = verify_output(str(output))
    assert verdict.problems == ["manifest.parquet: 1 current document(s) rejected as duplicates of content no current "
                                "document holds (a sync left them unembedded), first: b.md"]


def test_embed_all_with_sync_follows_the_corpus_and_says_so(tmp_path, caplog):
    """``luigi --module pipeline EmbedAll --sync``: the plan syncs the manifest, the new
    shards run as missing shards, the summary is written again; without --sync a finished
    run stays finished."""
    import logging

    import luigi

    from pipeline import EmbedAll

    corpus = write_corpus(tmp_path / "corpus", documents=8, words=60)
    settings = dict(corpus=str(corpus), output=str(tmp_path / "out"), docs_per_shard=PER_SHARD, device="cpu",
                    batch_tokens=16384, precision="float32")
    assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    EDITS[0](corpus)
    assert EmbedAll(**settings).complete(), "without --sync a finished run is done"
    assert not EmbedAll(**settings, sync=True).complete()
    with caplog.at_level(logging.INFO, logger="luigi-interface"):
        assert luigi.build([EmbedAll(**settings, sync=True)], local_scheduler=True, log_level="WARNING")
    assert any("synced to generation 1: 1 added, 3 changed, 1 moved, 1 deleted" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert (summary["shards"], summary["generation"], summary["current_documents"]) == (3, 1, 8)
    verdict = verify_output(str(tmp_path / "out"))
    assert verdict.ok and "generation 1: 8 current documents" in format_verdict(str(tmp_path / "out"), verdict)
    status = run_status(str(tmp_path / "out"))
    assert {k: status["sync"][k] for k in ("generation", "added", "changed", "moved", "deleted", "current_documents")} == {
        "generation": 1, "added": 1, "changed": 3, "moved": 1, "deleted": 1, "current_documents": 8}
    assert "sync: generation 1 (last sync " in format_status(status)
    from pipeline.output.report import gather, totals_rows

    assert ("sync", describe_sync(status["sync"])) in totals_rows(gather(str(tmp_path / "out")))
    fresh = tmp_path / "fresh"
    assert luigi.build([EmbedAll(**{**settings, "output": str(fresh)})], local_scheduler=True, log_level="WARNING")
    assert_same_view(tmp_path / "out", fresh)


def test_a_collection_kept_by_applying_each_change_log_equals_a_fresh_import(tmp_path, embedder):
    """docs/weaviate.md on a mapping level: a dict of uuid -> object stands for the
    collection; after each sync, deletes and upserts make it what importing the edited
    corpus afresh gives (a shorter document's extra chunks and moved ids gone)."""
    from pipeline.output.weaviate_import import weaviate_changes, weaviate_objects

    def imported(output):
        return {obj["uuid"]: obj for batch in stream_embeddings(str(output)) for obj in weaviate_objects(batch)}

    corpus = write_corpus(tmp_path / "corpus", documents=10, words=120)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    collection = imported(output)
    for generation, edit in enumerate(EDITS, start=1):
        edit(corpus)
        sync_output(str(corpus), "*.md", str(output))
        embed_missing_shards(corpus, output, embedder)
        changes = weaviate_changes(str(output), generation)
        for obj in changes.upsert:
            collection[obj["uuid"]] = obj
        assert changes.delete, "every round deletes or shortens something"
        if generation == 2:
            from pipeline.output.weaviate_import import object_uuid

            shortened = doc_id_for("part-2/doc-005.md")
            assert object_uuid(shortened, 1) in changes.delete and object_uuid(shortened, 0) not in changes.delete
        for uuid in changes.delete:
            del collection[uuid]  # a KeyError: a delete of an object never imported
        fresh = tmp_path / f"fresh-{generation}"
        full_run(corpus, fresh, embedder)
        expected = imported(fresh)
        assert collection.keys() == expected.keys()
        for uuid, obj in expected.items():
            assert collection[uuid]["properties"] == obj["properties"]
            assert np.allclose(collection[uuid]["vector"], obj["vector"], atol=1e-5)


def test_a_sync_of_a_bucket_output_follows_a_bucket_corpus(bucket, tmp_path, embedder):
    """gs:// and s3:// on the servers on loopback: the corpus edited in its bucket (an S3
    corpus's hashes are ETags, which follow the bytes as MD5s do), synced, verified and
    equal to a fresh run over the edited corpus."""
    import luigi

    from pipeline import EmbedAll

    local = write_corpus(tmp_path / "corpus", documents=10, words=60)
    bucket.upload_folder(local, "corpus")
    settings = dict(corpus=f"{bucket.url}/corpus", output=f"{bucket.url}/out", docs_per_shard=PER_SHARD, device="cpu",
                    batch_tokens=16384, precision="float32")
    assert luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING")
    EDITS[0](local)
    bucket.mirror_folder(local, "corpus")
    assert luigi.build([EmbedAll(**settings, sync=True)], local_scheduler=True, log_level="WARNING")
    assert last_sync(f"{bucket.url}/out")["moved"] == 1
    verdict = verify_output(f"{bucket.url}/out")
    assert verdict.ok, format_verdict(f"{bucket.url}/out", verdict)
    fresh = tmp_path / "fresh"
    full_run(local, fresh, embedder)
    assert_same_view(f"{bucket.url}/out", fresh)


@pytest.mark.parametrize("kind", ["local", "gcs", "s3"])
def test_a_sync_that_comes_late_never_puts_back_an_older_manifest(kind, request, tmp_path, monkeypatch):
    """Worker A makes generation 1 of the manifest; before it publishes, worker B
    publishes generations 1 and 2. A's manifest is then refused (compare-and-swap), and A
    reads again instead of putting the corpus back one sync."""
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=60)
    output = str(tmp_path / "out") if kind == "local" else request.getfixturevalue(f"{kind}_bucket").url + "/out"
    write_manifest(str(corpus), "*.md", PER_SHARD, f"{output}/manifest.parquet")
    EDITS[0](corpus)
    real_publish = sync.publish_manifest

    seen_after_a = []

    def a_slow_worker(*args):
        if getattr(a_slow_worker, "overtaken", False):  # B's publishes, and A's after it reads again
            return real_publish(*args)
        a_slow_worker.overtaken = True
        assert sync_output(str(corpus), "*.md", output).generation == 1  # B applies A's change log
        EDITS[1](corpus)
        assert sync_output(str(corpus), "*.md", output).generation == 2
        published = real_publish(*args)
        seen_after_a.append(manifest_info(f"{output}/manifest.parquet")["generation"])
        return published

    monkeypatch.setattr(sync, "publish_manifest", a_slow_worker)
    assert sync_output(str(corpus), "*.md", output).generation == 2
    assert seen_after_a == ["2"], "A's late manifest put generation 1 back, if only for a moment"
    assert manifest_info(f"{output}/manifest.parquet")["generation"] == "2"
    manifest = read_manifest(f"{output}/manifest.parquet")
    current = manifest.filter(manifest["superseded_in"].is_null())
    assert sorted(current["path"].to_pylist()) == [d.relative for d in list_documents(str(corpus), "*.md")]


def test_compact_writes_the_current_view_as_a_new_output_that_verifies(tmp_path, embedder, capsys):
    """``python -m pipeline compact``: three syncs' history dropped, the current view kept
    row for row (moved documents stored under their new ids), the source untouched."""
    from pipeline.cli import main

    corpus = write_corpus(tmp_path / "corpus", documents=10, words=120)
    output = tmp_path / "out"
    full_run(corpus, output, embedder)
    for edit in EDITS:
        edit(corpus)
        sync_output(str(corpus), "*.md", str(output))
        embed_missing_shards(corpus, output, embedder)
    before = shard_files(output)
    compacted = tmp_path / "compacted"
    assert main(["compact", str(output), str(compacted)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert shard_files(output) == before
    assert_same_view(compacted, output)
    stored = {(row["doc_id"], row["chunk_id"]) for path in (compacted / "shards").glob("*.parquet")
              for row in pq.read_table(path, columns=["doc_id", "chunk_id"]).to_pylist()}
    assert stored == set(current_view(output)), "the compacted shards hold superseded or old-id rows"
    assert "generation" not in pq.read_schema(compacted / "manifest.parquet").names
    assert main(["compact", str(output), str(compacted)]) == 2, "compacted twice into one finished output"
