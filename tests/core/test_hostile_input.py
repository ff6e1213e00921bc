"""Hostile and broken input through the real listing and shard path.

Every document of the manifest must end up either embedded or rejected with a reason
that docs/schema.md documents; the others must be embedded; listing must end on symlink
loops and never leave the corpus; nothing from outside the corpus may reach a shard.
"""

import json
import os
import re
import resource

import pyarrow.parquet as pq
import pytest

from helpers import ROOT, write_corpus
from pipeline.core.chunking import MAX_TITLE_CHARS
from pipeline.core.corpus import manifest_rows, write_manifest
from pipeline.core.null_embedder import NullEmbedder
from pipeline.errors import PipelineError
from pipeline.planning import check_output_matches_settings
from pipeline.output.layout import OutputLayout
from pipeline.output.read_back import read_shard
from pipeline.output.verify import verify_output
from pipeline.core.shard_job import ShardJob, run_shard

SECRET = "TOPSECRET-outside-the-corpus"
BODY = "A short paragraph about the working day, wages and the price of bread.\n"


def documented_reasons() -> set[str]:
    """The reason codes of docs/schema.md's rejects table."""
    text = (ROOT / "docs" / "schema.md").read_text()
    table = text.split("| reason | when |", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))


def run(corpus, output, embedder, docs_per_shard=1000, before_reading=None, **options):
    """Manifest, then (after ``before_reading``) every shard: (manifest rows, rows by path, rejects by path, stats)."""
    manifest = str(output / "manifest.parquet")
    count = write_manifest(str(corpus), "*.md", docs_per_shard, manifest)
    if before_reading:
        before_reading()
    total = -(-count // docs_per_shard)
    rows, chunks, rejects, stats = [], {}, {}, []
    for shard in range(total):
        rows += manifest_rows(manifest, shard)
        stats.append(run_shard(ShardJob(str(corpus), manifest, str(output), total, **options), shard, embedder))
        for row in pq.read_table(OutputLayout.of(str(output)).shard(shard)).to_pylist():
            chunks.setdefault(row["metadata"]["path"], []).append(row)
        if os.path.exists(OutputLayout.of(str(output)).rejects_of(shard)):
            for line in open(OutputLayout.of(str(output)).rejects_of(shard), encoding="utf-8"):
                reject = json.loads(line)
                rejects[reject["path"]] = reject
    return rows, chunks, rejects, stats


def document_text(corpus, path, encoding):
    """The document text as docs/schema.md says to rebuild it from the file."""
    data = (corpus / path).read_bytes()
    if encoding.startswith("utf-8"):
        text = data.decode("utf-8-sig", errors="replace" if encoding == "utf-8-replace" else "strict")
    else:
        text = data.decode(encoding)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_outcomes(corpus, rows, chunks, rejects, stats, max_tokens):
    """Each document embedded xor rejected with a documented reason; chunks exact and bounded."""
    paths = [row["path"] for row in rows]
    assert set(chunks) | set(rejects) == set(paths)
    assert not set(chunks) & set(rejects)
    assert {r["reason"] for r in rejects.values()} <= documented_reasons()
    assert all(r["detail"] for r in rejects.values())
    for path, doc_chunks in chunks.items():
        assert [c["chunk_id"] for c in doc_chunks] == list(range(len(doc_chunks)))
        text = document_text(corpus, path, doc_chunks[0]["metadata"]["encoding"])
        for c in doc_chunks:
            m = c["metadata"]
            assert text[m["char_start"] : m["char_end"]] == c["text"], path
            assert 0 < m["token_count"] <= max_tokens
            assert SECRET not in c["text"]
    assert sum(s["documents"] for s in stats) == len(paths)
    assert sum(s["rejected_documents"] for s in stats) == len(rejects)
    by_reason = {}
    for s in stats:
        for reason, n in s["rejected_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    assert by_reason == {reason: sum(r["reason"] == reason for r in rejects.values()) for reason in by_reason}


def good(corpus, name, title="Good"):
    path = corpus / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\ntitle: {title}\n---\n\n# {title}\n\n{name}: {BODY}")
    return path


@pytest.fixture
def hostile(tmp_path):
    """A corpus of strange names, links, broken encodings and odd front matter, beside
    an outside folder holding a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text(f"# Secret\n\n{SECRET}\n")
    corpus = write_corpus(tmp_path / "corpus", documents=3, words=60)

    # Names: traversal-looking, backslashes, a newline, 255 bytes, unicode, hidden.
    good(corpus, "a..%2f..%2fescape.md")
    good(corpus, "..%2f..%2fhidden.md")  # starts with a dot: hidden, so not listed
    (corpus / "...").mkdir()  # a folder named '...': hidden
    good(corpus, ".../inside-dots.md")
    good(corpus, "back\\slash\\name.md")
    good(corpus, "new\nline.md")
    good(corpus, "L" * 252 + ".md")
    good(corpus, "ünïcødé-名前 with spaces.md")
    with open(os.path.join(os.fsencode(corpus), b"bad-\xff-name.md"), "wb") as f:  # not UTF-8: skipped
        f.write(BODY.encode())

    # Links: a loop to the parent, a link out of the corpus (file and folder), one
    # that dangles, one that loops on itself, one inside the corpus (kept), a pipe.
    (corpus / "sub").mkdir()
    good(corpus, "sub/real.md")
    os.symlink("..", corpus / "sub" / "loop")
    os.symlink(corpus / "sub", corpus / "sub-again")
    os.symlink(outside / "secret.md", corpus / "escape.md")
    os.symlink("../../outside", corpus / "sub" / "outside-folder")
    os.symlink("nothing-here.md", corpus / "dangling.md")
    os.symlink("self.md", corpus / "self.md")
    os.symlink("sub/real.md", corpus / "alias.md")
    os.mkfifo(corpus / "pipe.md")

    # Bytes: invalid UTF-8 in the middle of UTF-8, NUL bytes, UTF-16 that is not.
    (corpus / "mixed.md").write_bytes("# Mixed\n\nCafé crème, naïve.\n".encode() + b"\xff\x81 broken \xfe\n" + "Après.\n".encode())
    (corpus / "nul.md").write_bytes(b"# Nul\n\nText with a NUL \x00 in the middle.\n")
    (corpus / "utf16-broken.md").write_bytes(b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00\xd8")
    (corpus / "empty.md").write_bytes(b"")
    (corpus / "blank.md").write_text(" \n\t\n\n")
    (corpus / "crlf.md").write_bytes(b"# CRLF\r\n\r\nWindows line ends.\r\nOld Mac\rline ends.\r\n")

    # Long lines: 5 MB without a newline or a space; a heading line with 5,000 inner
    # spaces (the old heading pattern backtracked cubically on it: minutes).
    (corpus / "long-line.md").write_text("# Long line\n\n" + "abcdefghij" * 500_000)
    (corpus / "spaces-heading.md").write_text("# a" + " " * 5_000 + "b\n\nAfter the heading.\n")

    # Headings: 7+ hashes (not headings), 1,000 hashes, levels 1 to 6 and back, nested
    # quotes and lists (10,000 levels: the next test, without the model).
    (corpus / "headings.md").write_text(
        "####### seven is no heading\n\n" + "#" * 1000 + "\n\n" + "#" * 1000 + " title\n\n"
        + "".join(f"{'#' * (1 + i % 6)} Level {1 + i % 6}\n\nText {i}.\n\n" for i in range(12))
        + "> " * 100 + "deep quote\n\n" + "".join("  " * i + "- item\n" for i in range(20))
    )

    # Front matter that is not a mapping, or not YAML, or hostile YAML.
    fm = {
        "fm-list.md": "---\n- a\n- b\n---\n",
        "fm-scalar.md": "---\njust a string\n---\n",
        "fm-invalid.md": "---\ntitle: [oops\n---\n",
        "fm-tabs.md": "---\n\ttitle: x\n---\n",
        "fm-alias-bomb.md": "---\na: &a [x,x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "---\n",
        "fm-recursive-alias.md": "---\na: &a [*a]\n---\n",
        "fm-deep.md": "---\nx: " + "[" * 2_000 + "]" * 2_000 + "\n---\n",
        "fm-unclosed.md": "---\ntitle: never closed\n",
        "fm-only.md": "---\ntitle: nothing else\n---\n",
        "fm-huge.md": "---\ntitle: " + "long " * 20_000 + "\n---\n",
    }
    for name, front in fm.items():
        (corpus / name).write_text(front if name == "fm-only.md" else front + f"\n{name}: {BODY}")

    # Two copies of one document, and files changed after the manifest is written.
    (corpus / "dup").mkdir()
    for name in ("one.md", "two.md"):
        (corpus / "dup" / name).write_text(f"# Copy\n\n{BODY}")
    for name in ("vanishes.md", "changes.md", "becomes-link.md", "becomes-pipe.md"):
        good(corpus, name)
    return corpus


def after_manifest(corpus, outside):
    def change():
        (corpus / "vanishes.md").unlink()
        (corpus / "changes.md").write_text("# Changed\n\nNew words.\n")
        (corpus / "becomes-link.md").unlink()
        os.symlink(outside / "secret.md", corpus / "becomes-link.md")
        (corpus / "becomes-pipe.md").unlink()
        os.mkfifo(corpus / "becomes-pipe.md")

    return change


@pytest.mark.timeout(180)
def test_hostile_corpus_each_document_embedded_or_rejected_and_nothing_escapes(tmp_path, hostile, embedder, caplog):
    caplog.set_level("WARNING", logger="luigi-interface")
    rows, chunks, rejects, stats = run(hostile, tmp_path / "out", embedder,
                                       before_reading=after_manifest(hostile, tmp_path / "outside"))
    paths = {row["path"] for row in rows}

    # Listing ended, stayed inside and left out what is not a document of this corpus.
    assert not any("loop/" in p or "sub-again/" in p or "outside-folder/" in p for p in paths)
    assert not {"escape.md", "dangling.md", "self.md", "pipe.md", "..%2f..%2fhidden.md", ".../inside-dots.md"} & paths
    assert not any("bad-" in p for p in paths)
    for kept in ("a..%2f..%2fescape.md", "back\\slash\\name.md", "new\nline.md", "L" * 252 + ".md",
                 "ünïcødé-名前 with spaces.md", "alias.md", "sub/real.md"):
        assert kept in paths and kept in chunks, kept
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    for why in ("leads out of the corpus", "folder is not followed", "not UTF-8", "not a regular file",
                "no regular file", "symbolic links"):
        assert why in skipped, why

    check_outcomes(hostile, rows, chunks, rejects, stats, embedder.chunker.max_tokens)
    assert {path: r["reason"] for path, r in rejects.items()} == {
        "nul.md": "binary",
        "utf16-broken.md": "undecodable",
        "empty.md": "empty",
        "blank.md": "empty",
        "fm-only.md": "no_text",
        "vanishes.md": "missing",
        "changes.md": "changed",
        "becomes-link.md": "outside_corpus",
        "becomes-pipe.md": "unreadable",
    }
    assert "regular file" in rejects["becomes-pipe.md"]["detail"]

    # What was embedded, and how.
    assert {"dup/one.md", "dup/two.md"} <= set(chunks)  # duplicates are embedded by default
    mixed = chunks["mixed.md"][0]["metadata"]
    assert mixed["encoding"] == "utf-8-replace"  # the UTF-8 text survives, the bad bytes become U+FFFD
    assert "Café crème, naïve." in chunks["mixed.md"][0]["text"] and "\ufffd\ufffd broken \ufffd" in chunks["mixed.md"][0]["text"]
    crlf = " ".join(c["text"] for c in chunks["crlf.md"])
    assert "\r" not in crlf and "Old Mac\nline ends." in crlf
    long_line = chunks["long-line.md"]
    assert long_line[-1]["metadata"]["char_end"] == len("# Long line\n\n") + 5_000_000
    assert chunks["spaces-heading.md"][0]["metadata"]["heading_path"] == [("a" + " " * 5_000 + "b")[:MAX_TITLE_CHARS]]
    heading_paths = [c["metadata"]["heading_path"] for c in chunks["headings.md"]]
    assert all(len(h) <= 6 for h in heading_paths)
    assert "####### seven is no heading" in chunks["headings.md"][0]["text"]
    assert heading_paths[0] == []  # neither 7 hashes nor 1,000 hashes make a heading

    errors = {name: chunks[name][0]["metadata"]["front_matter_error"] for name in chunks if name.startswith("fm-")}
    assert errors["fm-list.md"] == "front matter is a list, not a mapping"
    assert errors["fm-scalar.md"] == "front matter is a str, not a mapping"
    assert errors["fm-invalid.md"].startswith("front matter is not valid YAML")
    assert errors["fm-tabs.md"].startswith("front matter is not valid YAML")
    assert errors["fm-alias-bomb.md"] == "front matter uses a YAML alias (*a), which is not read"
    assert errors["fm-recursive-alias.md"] == "front matter uses a YAML alias (*a), which is not read"
    assert errors["fm-deep.md"] == "front matter is nested too deeply"
    assert errors["fm-huge.md"] == "front matter is longer than 65,536 characters"
    assert errors["fm-unclosed.md"] is None  # no closing line: not front matter, all text
    for name in errors:
        if name != "fm-unclosed.md":
            assert chunks[name][0]["metadata"]["front_matter"] == "{}"
            assert [c["text"] for c in chunks[name]] == [f"{name}: {BODY.strip()}"], name
    assert chunks["fm-unclosed.md"][0]["text"].startswith("---\ntitle: never closed")


@pytest.mark.timeout(300)
def test_huge_lines_headings_and_front_matter_stay_bounded_in_time_and_memory(tmp_path, embedder):
    """Megabytes in one line, one heading or one front matter: chunks within the budget,
    and no copy of a huge title or front matter in every row (which took gigabytes)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "word " * 1_000_000  # 5 MB, one line
    title = "word " * 200_000  # 1 MB: copied into each of 1,500 rows, 3 GB before titles were cut
    paragraphs = "\n\n".join(f"Paragraph {i} " + "text " * 300 for i in range(300))
    (corpus / "one-line.md").write_text(words)
    (corpus / "huge-heading.md").write_text("# " + title + "\n\n" + paragraphs)
    (corpus / "huge-front-matter.md").write_text("---\ntitle: " + title + "\n---\n\n" + paragraphs)
    (corpus / "many-headings.md").write_text("".join(f"{'#' * (1 + i % 6)} H{i}\n\nText {i}.\n\n" for i in range(10_000)))
    (corpus / "deep-nesting.md").write_text(
        "> " * 10_000 + "deep quote\n\n" + "".join("  " * i + "- item\n" for i in range(1_000))
        + "".join("#" * (7 + i) + " not a heading\n" for i in range(1_000))
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    null = NullEmbedder(embedder)
    rows, chunks, rejects, stats = run(corpus, tmp_path / "out", null)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert not rejects and set(chunks) == {row["path"] for row in rows}
    check_outcomes(corpus, rows, chunks, rejects, stats, embedder.chunker.max_tokens)
    assert chunks["one-line.md"][-1]["metadata"]["char_end"] == len(words.rstrip())
    titles = {len(t) for c in chunks["huge-heading.md"] for t in c["metadata"]["heading_path"]}
    assert titles == {MAX_TITLE_CHARS}
    assert {c["metadata"]["front_matter_error"] for c in chunks["huge-front-matter.md"]} == \
        {"front matter is longer than 65,536 characters"}
    assert max(len(c["metadata"]["heading_path"]) for c in chunks["many-headings.md"]) == 6
    assert grown_mb < 1500, f"peak memory grew by {grown_mb:.0f} MB"


@pytest.fixture
def duplicated(tmp_path):
    """Six documents, two per shard: a.md, c.md and f.md share content, b.md and e.md."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    contents = {"a": "X", "b": "Y", "c": "X", "d": "Z", "e": "Y", "f": "X"}
    for name, content in contents.items():
        (corpus / f"{name}.md").write_text(f"# Document {content}\n\nThe text of {content}. {BODY}")
    return corpus


def test_duplicates_are_embedded_unless_skip_duplicates(tmp_path, duplicated, embedder):
    rows, chunks, rejects, stats = run(duplicated, tmp_path / "off", embedder, docs_per_shard=2)
    assert not rejects and len(chunks) == 6

    rows, chunks, rejects, stats = run(duplicated, tmp_path / "on", embedder, docs_per_shard=2, skip_duplicates=True)
    check_outcomes(duplicated, rows, chunks, rejects, stats, embedder.chunker.max_tokens)
    assert sorted(chunks) == ["a.md", "b.md", "d.md"]
    assert {path: r["reason"] for path, r in rejects.items()} == {"c.md": "duplicate", "e.md": "duplicate", "f.md": "duplicate"}
    assert "a.md" in rejects["c.md"]["detail"] and "b.md" in rejects["e.md"]["detail"] and "a.md" in rejects["f.md"]["detail"]
    assert [s["rejected_by_reason"] for s in stats] == [{}, {"duplicate": 1}, {"duplicate": 2}]
    assert [s["embedded_documents"] for s in stats] == [2, 1, 0]


def test_a_duplicate_in_the_same_shard_names_the_first_copy(tmp_path, duplicated, embedder):
    rows, chunks, rejects, stats = run(duplicated, tmp_path / "out", embedder, docs_per_shard=10, skip_duplicates=True)
    assert {path: r["detail"] for path, r in rejects.items()} == {
        "c.md": "same content_hash as a.md, earlier in the manifest",
        "e.md": "same content_hash as b.md, earlier in the manifest",
        "f.md": "same content_hash as a.md, earlier in the manifest",
    }
    assert stats[0]["rejected_by_reason"] == {"duplicate": 3}


def test_skip_duplicates_is_a_run_parameter_recorded_in_the_summary(tmp_path, duplicated, embedder):
    import subprocess
    import sys

    import luigi

    from helpers import luigi_env
    from pipeline import EmbedAll

    show = "import pipeline; print(pipeline.EmbedAll(corpus='c', output='o').skip_duplicates)"
    result = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, env=luigi_env(PIPELINE_SKIP_DUPLICATES="true"),
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr  # the default, from the environment

    # The session's model settings, so the worker reuses the loaded model.
    settings = dict(corpus=str(duplicated), output=str(tmp_path / "out"), docs_per_shard=4, device="cpu",
                    batch_tokens=16384, precision="float32")
    task = EmbedAll(**settings, skip_duplicates=True)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    summary = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert summary["parameters"]["skip_duplicates"] is True
    assert summary["rejected_by_reason"] == {"duplicate": 3} and summary["embedded_documents"] == 3
    assert task.complete() and not EmbedAll(**settings, skip_duplicates=False).complete()
    # A rerun with the option off would mix shards that skip duplicates with shards that do not.
    with pytest.raises(PipelineError, match="skip_duplicates: True in the output, False now"):
        check_output_matches_settings(EmbedAll(**settings, skip_duplicates=False))

    # --sync follows it: a.md, which held X, is deleted, so its copy c.md is embedded now (f.md stays a copy).
    (duplicated / "a.md").unlink()
    assert luigi.build([EmbedAll(**settings, skip_duplicates=True, sync=True)], local_scheduler=True, log_level="WARNING")
    summary = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert (summary["generation"], summary["current_documents"]) == (1, 5)
    assert verify_output(str(tmp_path / "out")).ok
    assert {m["path"] for m in read_shard(str(OutputLayout.of(str(tmp_path / "out")).shard(2)))["metadata"].to_pylist()} == {"c.md"}
