"""The markdown-aware, token-bounded chunker, with the real model's tokenizer."""

from pipeline.core.chunking import MAX_BLOCK_CHARS, ChunkerSettings, blocks, chunk_document
from pipeline.core.corpus import decode, split_front_matter

DOC = """---
title: Wage Labour
author: K. M.
---

# Wage Labour and Capital

## I. Preliminary

First paragraph about wages.
It spans two lines.

Second paragraph.

```
# not a heading inside code
```

## II. What are wages?

### A sub point

Text under the sub point.

# Appendix

Last words.
"""


def chunks_of(text, embedder, max_tokens=None, overlap=8):
    fields, body_start, _ = split_front_matter(text)
    settings = ChunkerSettings(max_tokens or embedder.chunker.max_tokens, overlap)
    return chunk_document(text, body_start, embedder.tokenizer, settings)


def model_token_count(embedder, text):
    """Tokens the model itself sees for this chunk: prefix and special tokens included."""
    return len(embedder.model.tokenizer(embedder.profile.prefix + text)["input_ids"])


def test_blocks_follow_headings_and_ignore_hashes_in_code():
    _, body_start, _ = split_front_matter(DOC)
    found = blocks(DOC, body_start)
    headings = [DOC[b.start : b.end] for b in found if b.heading]
    assert headings == ["# Wage Labour and Capital", "## I. Preliminary", "## II. What are wages?", "### A sub point", "# Appendix"]
    by_text = {DOC[b.start : b.end]: b.heading_path for b in found}
    assert by_text["Second paragraph."] == ("Wage Labour and Capital", "I. Preliminary")
    assert by_text["Text under the sub point."] == ("Wage Labour and Capital", "II. What are wages?", "A sub point")
    assert by_text["Last words."] == ("Appendix",)
    assert "```\n# not a heading inside code\n```" in by_text


def test_front_matter_is_not_embedded_and_offsets_slice_the_document(embedder):
    chunks = chunks_of(DOC, embedder)
    assert chunks, "no chunks"
    assert all("title: Wage Labour" not in c.text for c in chunks)
    for c in chunks:
        assert c.text == DOC[c.char_start : c.char_end]
        assert c.text.strip() == c.text and c.text
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))


def test_a_chunk_never_crosses_into_a_new_heading_section(embedder):
    chunks = chunks_of(DOC, embedder)
    assert [c.text.splitlines()[0] for c in chunks] == [
        "# Wage Labour and Capital",
        "## II. What are wages?",
        "# Appendix",
    ]
    assert chunks[1].heading_path == ("Wage Labour and Capital", "II. What are wages?", "A sub point")


def test_small_budget_splits_at_paragraphs(embedder):
    chunks = chunks_of(DOC, embedder, max_tokens=12)
    texts = [c.text for c in chunks]
    assert "Second paragraph." in texts
    assert all(c.token_count <= 12 for c in chunks)


def test_long_paragraph_is_split_in_overlapping_windows_within_the_limit(embedder):
    words = " ".join(f"word{i % 50} alpha beta" for i in range(900))
    text = f"# Long\n\n{words}\n"
    budget = embedder.chunker.max_tokens
    chunks = chunks_of(text, embedder, overlap=16)
    assert len(chunks) > 3
    for c in chunks:
        assert model_token_count(embedder, c.text) <= embedder.max_tokens
        assert c.token_count <= budget
    for first, second in zip(chunks[1:], chunks[2:]):
        assert second.char_start < first.char_end, "windows do not overlap"
        assert text[second.char_start - 1] == " ", "window starts mid-word"
    assert chunks[-1].char_end == len(text.rstrip())


def test_chunking_is_deterministic(embedder):
    first = chunks_of(DOC, embedder)
    assert chunks_of(DOC, embedder) == first


def test_whitespace_only_body_gives_no_chunks(embedder):
    assert chunks_of("---\ntitle: x\n---\n\n   \n\n", embedder) == []


def test_a_paragraph_longer_than_the_block_limit_is_cut_and_covered(embedder):
    paragraph = ("abc " * (MAX_BLOCK_CHARS // 2)).strip()
    chunks = chunks_of(paragraph, embedder)
    assert all(c.token_count <= embedder.chunker.max_tokens for c in chunks)
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(paragraph)


def test_every_chunk_of_the_real_corpus_fits_the_model(embedder, shared_corpus):
    """The archive sample: no chunk may be truncated by the model, offsets exact."""
    paths = sorted(shared_corpus.rglob("*.md"))[::7]
    assert paths
    for path in paths:
        text, _ = decode(path.read_bytes())
        chunks = chunks_of(text, embedder, overlap=32)
        assert chunks, path
        for c in chunks:
            assert c.text == text[c.char_start : c.char_end]
            assert model_token_count(embedder, c.text) <= embedder.max_tokens, (path, c.chunk_id)


def test_the_model_gets_the_chunkers_own_ids_framed_as_its_tokenizer_would(embedder):
    """Text is tokenized once, by the chunker: the model is fed those ids, framed with
    the special tokens and the prefix (here nomic's, on the offline model's weights), and
    they are exactly what the model's tokenizer gives for prefix + chunk text, so the
    vectors are ``encode``'s, windows of an over-long paragraph included."""
    import dataclasses

    import numpy as np

    from pipeline.core.profiles import PROFILES
    from pipeline.core.embedder import Embedder

    prefixed = Embedder(dataclasses.replace(PROFILES["minilm"], prefix="search_document: "), "", "cpu", 0, 4096, "float32")
    long_paragraph = " ".join(f"surplus-value{i} accumulates, unpaid labour-time" for i in range(300))
    text = DOC + "\n## III. Accumulation\n\n" + long_paragraph + "\n"
    chunks = chunks_of(text, prefixed, overlap=16)
    assert len(chunks) > 6 and max(c.token_count for c in chunks) == prefixed.chunker.max_tokens  # windows too
    framed = prefixed._features([c.token_ids for c in chunks])
    for row, chunk in enumerate(chunks):
        expected = prefixed.model.tokenizer(prefixed.profile.prefix + chunk.text)["input_ids"]
        assert framed["input_ids"][row, : len(expected)].tolist() == expected
        assert framed["attention_mask"][row].sum().item() == len(expected)
    ours = prefixed.embed([c.token_ids for c in chunks])
    theirs = prefixed.model.encode([prefixed.profile.prefix + c.text for c in chunks], normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-5
