"""Markdown-aware chunking bounded by the model's own token count.

A document body is cut into blocks (ATX headings, paragraphs, fenced code). Blocks
are packed greedily into chunks that never cross into a new heading section and never
exceed the token budget; a block longer than the budget is split into windows with a
small overlap, cut at word boundaries. A chunk's text is exactly
``document.text[char_start:char_end]``, so offsets can be checked by anyone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

# An ATX heading: 1 to 6 hashes, whitespace, the title. The closing hashes are cut off
# by ``_heading_title``, not here: a lazy title followed by ``[ \t]*#*[ \t]*$`` backtracks
# cubically on a heading line with a long run of inner spaces (minutes for one line).
_HEADING = re.compile(r"(#{1,6})[ \t]+(.*)")
_FENCE = re.compile(r"(```|~~~)")
# Blocks longer than this are cut at whitespace before tokenizing, so one huge
# paragraph never becomes one huge tokenizer call.
MAX_BLOCK_CHARS = 20_000
# Heading titles are cut to this length in ``heading_path``: every chunk of a section
# carries them, so one huge heading line would be copied into thousands of rows.
MAX_TITLE_CHARS = 1_000
_ENCODE_BATCH = 512


@dataclass(frozen=True)
class Block:
    start: int
    end: int
    heading: bool
    heading_path: tuple[str, ...]


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    text: str
    char_start: int
    char_end: int
    token_count: int
    heading_path: tuple[str, ...]
    # The text's token ids (no special tokens): the model takes these, so the text is
    # tokenized once, here, and not again before embedding.
    token_ids: np.ndarray = field(default=None, compare=False, repr=False)


# Tokens a window repeats from the one before it, when a long block is split.
CHUNK_OVERLAP_TOKENS = 32


@dataclass(frozen=True)
class ChunkerSettings:
    max_tokens: int  # budget for the chunk text itself, prefix and special tokens excluded
    overlap_tokens: int

    def as_metadata(self) -> dict[str, str]:
        return {"chunk_max_tokens": str(self.max_tokens), "chunk_overlap_tokens": str(self.overlap_tokens)}


def chunk_budget(tokenizer: Tokenizer, model_max_tokens: int, prefix: str) -> tuple[ChunkerSettings, int]:
    """The chunker's settings for a model, and the tokens each chunk adds beyond its
    text: special tokens and the prefix count against the model's limit."""
    reserved = tokenizer.num_special_tokens_to_add(False) + len(tokenizer.encode(prefix, add_special_tokens=False).ids)
    return ChunkerSettings(max_tokens=model_max_tokens - reserved, overlap_tokens=CHUNK_OVERLAP_TOKENS), reserved


def plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of the model's fast tokenizer without padding or truncation (models ship
    with both set, which would make counts wrong)."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def _heading_title(rest: str) -> str:
    """A heading's title without its optional closing sequence of hashes, at most
    MAX_TITLE_CHARS long."""
    return rest.rstrip(" \t").rstrip("#").rstrip(" \t")[:MAX_TITLE_CHARS]


def _lines(text: str, start: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each line from ``start``, end excluding the newline."""
    position = start
    length = len(text)
    while position < length:
        newline = text.find("\n", position)
        end = length if newline < 0 else newline
        yield position, end
        position = end + 1


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _cut_long(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Cut a span longer than MAX_BLOCK_CHARS at whitespace (or hard, if there is none)."""
    while end - start > MAX_BLOCK_CHARS:
        limit = start + MAX_BLOCK_CHARS
        cut = max(text.rfind(" ", start, limit), text.rfind("\n", start, limit))
        cut = cut if cut > start + MAX_BLOCK_CHARS // 2 else limit
        yield _trimmed(text, start, cut)
        start, end = _trimmed(text, cut, end)
    if end > start:
        yield start, end


def blocks(text: str, body_start: int) -> list[Block]:
    """Headings, paragraphs and fenced code blocks of the body, with their heading path."""
    found: list[Block] = []
    path: list[tuple[int, str]] = []
    paragraph_start = None
    paragraph_end = 0
    fence = None

    def close_paragraph():
        nonlocal paragraph_start
        if paragraph_start is not None:
            trail = tuple(title for _, title in path)
            for s, e in _cut_long(text, *_trimmed(text, paragraph_start, paragraph_end)):
                found.append(Block(s, e, False, trail))
            paragraph_start = None

    for line_start, line_end in _lines(text, body_start):
        line = text[line_start:line_end]
        stripped = line.strip()
        if fence is not None:
            paragraph_end = line_end
            if stripped.startswith(fence):
                fence = None
                close_paragraph()
            continue
        fence_match = _FENCE.match(stripped)
        if fence_match:
            close_paragraph()
            fence = fence_match.group(1)
            paragraph_start, paragraph_end = line_start, line_end
            continue
        heading = _HEADING.match(stripped)
        if heading:
            close_paragraph()
            level, title = len(heading.group(1)), _heading_title(heading.group(2))
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, title))
            for s, e in _cut_long(text, *_trimmed(text, line_start, line_end)):  # a heading can be huge too
                found.append(Block(s, e, True, tuple(t for _, t in path)))
        elif not stripped:
            close_paragraph()
        else:
            if paragraph_start is None:
                paragraph_start = line_start
            paragraph_end = line_end
    close_paragraph()
    return found


def _word_boundary(offsets: Sequence[tuple[int, int]], words: Sequence, end_index: int, floor: int) -> int:
    """Move a window end back (not below ``floor``) so it does not split a word: to a
    space between two of the tokenizer's words if there is one, else to where two
    words meet without one (``a.b/c``), so that the window's text tokenizes to the
    window's ids. Only one word of more tokens than the range is cut inside."""
    if end_index >= len(offsets):
        return end_index
    candidates = range(end_index, floor, -1)
    for j in candidates:
        if words[j] != words[j - 1] and offsets[j][0] > offsets[j - 1][1]:
            return j
    for j in candidates:
        if words[j] != words[j - 1]:
            return j
    return end_index


def _windows(offsets: Sequence[tuple[int, int]], words: Sequence, budget: int, overlap: int) -> Iterator[tuple[int, int]]:
    """Token index ranges [i, j) of at most ``budget`` tokens, each starting about
    ``overlap`` tokens before the previous one ended (overlap is at most budget/4);
    ``words``: each token's word index, from the tokenizer."""
    overlap = min(overlap, budget // 4)
    count = len(offsets)
    start = 0
    while True:
        end = min(start + budget, count)
        if end < count:
            end = _word_boundary(offsets, words, end, start + budget // 2)
        yield start, end
        if end >= count:
            return
        start = _word_boundary(offsets, words, max(end - overlap, start + 1), start)


def chunk_document(text: str, body_start: int, tokenizer: Tokenizer, settings: ChunkerSettings) -> list[Chunk]:
    """Chunks of one document, in order, with deterministic ids 0..n-1."""
    found = blocks(text, body_start)
    budget = settings.max_tokens
    pieces: list[tuple[int, int, np.ndarray, tuple[str, ...]]] = []  # start, end, token ids, heading path
    pending: list[tuple[Block, np.ndarray]] = []

    def flush():
        if pending:
            first, last = pending[0][0], pending[-1][0]
            ids = pending[0][1] if len(pending) == 1 else np.concatenate([ids for _, ids in pending])
            pieces.append((first.start, last.end, ids, last.heading_path))
            pending.clear()

    for batch_start in range(0, len(found), _ENCODE_BATCH):
        batch = found[batch_start : batch_start + _ENCODE_BATCH]
        encodings = tokenizer.encode_batch([text[b.start : b.end] for b in batch], add_special_tokens=False)
        for block, encoding in zip(batch, encodings):
            ids = np.array(encoding.ids, dtype=np.int32)
            tokens = len(ids)
            if tokens == 0:
                continue
            starts_section = block.heading and any(not b.heading for b, _ in pending)
            if starts_section or sum(len(i) for _, i in pending) + tokens > budget:
                flush()
            if tokens <= budget:
                pending.append((block, ids))
                continue
            offsets = encoding.offsets
            for i, j in _windows(offsets, encoding.word_ids, budget, settings.overlap_tokens):
                pieces.append((block.start + offsets[i][0], block.start + offsets[j - 1][1], ids[i:j], block.heading_path))
    flush()
    return [
        Chunk(chunk_id, text[start:end], start, end, len(ids), path, ids)
        for chunk_id, (start, end, ids, path) in enumerate(pieces)
    ]
