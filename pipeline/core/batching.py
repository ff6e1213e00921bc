"""Which chunks go into which batch, and at what tensor shape.

A GPU pays a set-up cost for every new tensor shape it meets (cuDNN's attention plans
one per shape: on an H200 a first pass over new shapes ran at a tenth of the warm
rate, docs/performance.md). So on a GPU batch widths come from a small fixed set and
row counts from the token budget: a whole run meets a few dozen shapes, each warmed
once when the model loads. A CPU has no such cost and pays for every padded token, so
there widths are rounded more finely and rows are not rounded at all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence


def batch_widths(max_tokens: int, finest: int) -> tuple[int, ...]:
    """Padded widths a batch may have, up to ``max_tokens``: steps of ``finest`` up to 256
    tokens, then twice, four and eight times as coarse (a long row loses less to a step)."""
    widths, width = [], 0
    while width < max_tokens:
        width += finest * (1 if width < 256 else 2 if width < 512 else 4 if width < 1024 else 8)
        widths.append(min(width, max_tokens))
    return tuple(widths)


@dataclass(frozen=True)
class ShapePolicy:
    """How batches are shaped: ``widths`` a batch is padded up to (``()``: each batch as
    wide as its longest chunk, as before bucketing) and whether a last, short batch's
    rows are padded up to a power of two (so it too has one of few shapes)."""

    widths: tuple[int, ...] = ()
    round_rows: bool = False

    @classmethod
    def for_device(cls, device: str, max_tokens: int) -> "ShapePolicy":
        if device.startswith("cuda"):
            return cls(batch_widths(max_tokens, 16), round_rows=True)
        return cls(batch_widths(max_tokens, 8), round_rows=False)

    def width(self, tokens: int) -> int:
        """The padded width for a batch whose longest row (framed) has ``tokens``."""
        if not self.widths or tokens > self.widths[-1]:
            return tokens
        return self.widths[bisect.bisect_left(self.widths, tokens)]

    def rows(self, chunks: int, full: int) -> int:
        """Rows of a batch of ``chunks`` chunks when a full one has ``full`` rows."""
        if not self.round_rows or chunks >= full:
            return chunks
        return min(1 << (chunks - 1).bit_length(), full)


@dataclass(frozen=True)
class Batch:
    """Chunks (indices into the embedded list) and the padded shape they run at; rows
    beyond the chunks repeat the first chunk and their vectors are dropped."""

    indices: list[int]
    rows: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.width


def plan_batches(token_counts: Sequence[int], frame_tokens: int, batch_tokens: int, policy: ShapePolicy) -> list[Batch]:
    """Chunks grouped longest first, each batch's padded size (rows × width) within
    ``batch_tokens`` (a single chunk wider than the budget runs alone)."""
    order = sorted(range(len(token_counts)), key=lambda i: -token_counts[i])
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        width = policy.width(token_counts[order[start]] + frame_tokens)
        full = max(1, batch_tokens // width)
        indices = order[start : start + full]
        batches.append(Batch(indices, policy.rows(len(indices), full), width))
        start += len(indices)
    return batches
