"""Listing, decoding, front matter and the manifest."""

import codecs
import hashlib
import os

import pyarrow.parquet as pq
import pytest

from pipeline.core.corpus import (
    Rejected,
    decode,
    doc_id_for,
    list_documents,
    manifest_info,
    manifest_rows,
    read_document,
    split_front_matter,
    write_manifest,
)
from pipeline.errors import PipelineError


def test_utf8_is_decoded_and_bom_dropped():
    text, encoding = decode(codecs.BOM_UTF8 + "Größe “quoted”\r\nnext".encode("utf-8"))
    assert (text, encoding) == ("Größe “quoted”\nnext", "utf-8")


def test_latin1_archive_text_is_decoded_not_mangled():
    original = "Misère de la philosophie — réponse à M. Proudhon"
    data = original.replace("—", "-").encode("iso-8859-1")
    text, encoding = decode(data)
    assert text == original.replace("—", "-")
    assert encoding in ("cp1252", "latin-1")


def test_cp1252_smart_quotes_are_decoded():
    text, encoding = decode("“Workers” – unite".encode("cp1252"))
    assert (text, encoding) == ("“Workers” – unite", "cp1252")


def test_bytes_undefined_in_cp1252_fall_back_to_latin1():
    text, encoding = decode(b"caf\xe9 \x81")
    assert encoding == "latin-1" and text.startswith("café")


def test_utf16_with_bom_is_text_not_binary():
    text, encoding = decode("hello wörld".encode("utf-16"))
    assert (text, encoding) == ("hello wörld", "utf-16")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b" \n\t\n", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (bytes(range(1, 32)) * 50, "binary"),
        (b"\xff\xfeA", "undecodable"),
    ],
)
def test_empty_and_binary_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected) as caught:
        decode(data)
    assert caught.value.reason == reason


def test_front_matter_becomes_fields_and_body_starts_after_it():
    text = "---\ntitle: Capital\ndate: 1867-09-14\ntags: [a, b]\n---\n\n# One\n\nBody.\n"
    fields, body_start, error = split_front_matter(text)
    assert error is None
    assert fields == {"title": "Capital", "date": "1867-09-14", "tags": ["a", "b"]}
    assert text[body_start:].lstrip().startswith("# One")


def test_broken_front_matter_is_cut_from_the_body_and_its_error_kept():
    text = "---\ntitle: [unclosed\nauthor: x: y\n---\nThe body.\n"
    fields, body_start, error = split_front_matter(text)
    assert fields == {} and "not valid YAML" in error
    assert text[body_start:] == "The body.\n"


def test_front_matter_that_is_not_a_mapping_is_an_error():
    fields, body_start, error = split_front_matter("---\n- a\n- b\n---\nBody\n")
    assert fields == {} and "not a mapping" in error and body_start > 0


def test_text_without_front_matter_has_body_at_zero():
    assert split_front_matter("# Title\n\n---\n\nafter a rule\n") == ({}, 0, None)


def test_listing_is_sorted_matches_the_pattern_and_skips_hidden(tmp_path):
    for name in ["b/2.md", "a/1.md", "a/notes.txt", ".git/x.md", "a/.hidden.md", "c.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [d.relative for d in list_documents(str(tmp_path), "*.md")] == ["a/1.md", "b/2.md", "c.md"]
    assert [d.relative for d in list_documents(str(tmp_path), "*.txt")] == ["a/notes.txt"]


def test_local_listing_is_in_the_byte_order_a_bucket_lists_in(tmp_path):
    names = ["a/b.md", "a-c.md", "a.md", "ab/x.md", "a/a/z.md", "Z.md", "é.md"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    listed = list(list_documents(str(tmp_path), "*.md"))
    assert [d.relative for d in listed] == sorted(names, key=lambda n: n.encode("utf-8"))
    assert all(d.content_hash == hashlib.md5(d.relative.encode()).hexdigest() and d.size == len(d.relative.encode()) for d in listed)


def test_missing_corpus_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        list(list_documents(str(tmp_path / "nope"), "*.md"))
    with pytest.raises(PipelineError, match="no files matching"):
        list(list_documents(str(tmp_path), "*.md"))


def test_manifest_has_stable_order_shards_and_hashes(tmp_path, small_corpus):
    manifest = str(tmp_path / "out" / "manifest.parquet")
    assert write_manifest(str(small_corpus), "*.md", 5, manifest) == 12
    table = pq.read_table(manifest)
    assert table.column_names == ["doc_id", "path", "bytes", "content_hash", "shard"]
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert [r["shard"] for r in rows] == [i // 5 for i in range(12)]
    assert all(r["doc_id"] == doc_id_for(r["path"]) for r in rows)
    assert all(r["bytes"] == (small_corpus / r["path"]).stat().st_size for r in rows)
    info = manifest_info(manifest)
    assert (info["documents"], info["shards"], info["docs_per_shard"]) == ("12", "3", "5")
    assert [r["path"] for r in manifest_rows(manifest, 2)] == [r["path"] for r in rows[10:]]
    # A second listing gives the same manifest rows.
    write_manifest(str(small_corpus), "*.md", 5, str(tmp_path / "again.parquet"))
    assert pq.read_table(tmp_path / "again.parquet").to_pylist() == rows


def test_document_changed_since_the_manifest_is_rejected(tmp_path, small_corpus):
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(str(small_corpus), "*.md", 100, manifest)
    row = manifest_rows(manifest, 0)[0]
    assert read_document(str(small_corpus), row).path == row["path"]
    (small_corpus / row["path"]).write_text("changed")
    with pytest.raises(Rejected, match="changed"):
        read_document(str(small_corpus), row)
    (small_corpus / row["path"]).unlink()
    with pytest.raises(Rejected, match="missing"):
        read_document(str(small_corpus), row)


def test_a_bucket_manifests_local_copy_follows_its_version_and_goes_with_the_process(tmp_path, small_corpus, gcs_bucket):
    """One download per process and version; an older version's copy is deleted when a
    newer one comes, and the last when the process ends, so a long-lived worker on a
    growing bucket output never fills its disk with copies."""
    import subprocess
    import sys

    from helpers import ROOT, luigi_env
    from pipeline.core.corpus import manifest_file
    from pipeline.core.manifest_growth import add_new_documents

    local = tmp_path / "out" / "manifest.parquet"
    write_manifest(str(small_corpus), "*.md", 5, str(local))
    gcs_bucket.upload_folder(tmp_path / "out", "out")
    manifest = f"{gcs_bucket.url}/out/manifest.parquet"
    first = manifest_file(manifest)
    assert manifest_file(manifest) == first and pq.read_table(first).num_rows == 12

    (small_corpus / "zz-new.md").write_text("# New\n\nA document added after the manifest.\n")
    assert add_new_documents(str(small_corpus), "*.md", manifest) == 1
    second = manifest_file(manifest)
    assert second != first and pq.read_table(second).num_rows == 13
    assert not os.path.exists(first), "the older version's copy was left behind"

    child = subprocess.run([sys.executable, "-c", COPIES_IN_PROCESSES, manifest], cwd=ROOT, env=luigi_env(**gcs_bucket.env),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    forked, own = child.stdout.split()[-2:]
    assert forked.endswith("manifest-copy.parquet") and own.endswith("manifest-copy.parquet") and len({forked, own, second}) == 3
    assert not os.path.exists(os.path.dirname(forked)), "a forked task process's copy outlived it"
    assert not os.path.exists(os.path.dirname(own)), "the copy outlived its process"


# A forked task process (as Luigi runs each task with --workers > 1) makes a copy of its
# own, which must go when it ends; then the process itself makes one.
COPIES_IN_PROCESSES = """
import multiprocessing, os, sys
from pipeline.core.corpus import manifest_file

def task(queue):
    queue.put(manifest_file(sys.argv[1]))

context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=task, args=(queue,))
process.start()
forked = queue.get(timeout=60)
process.join(60)
assert process.exitcode == 0, process.exitcode
print(forked, manifest_file(sys.argv[1]))
"""
