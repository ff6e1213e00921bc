"""A stand-in for the model that costs nothing: what is left is the feed (reading,
chunking, tokenizing, writing), which `make bench` measures and the memory benchmarks
push huge documents through."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np

from pipeline.core.embedder import Embedder


class NullEmbedder:
    """The real tokenizer and chunker with constant vectors instead of a model.

    Measures everything but the model (the feed rate) and lets huge documents be
    pushed through read, chunk and write where running the model would take hours.
    """

    def __init__(self, base: Embedder, overlap: bool = False):
        self.profile = base.profile
        self.device = "null"
        self.runs_off_cpu = overlap  # off: the feed rate is measured in one thread, per CPU-second
        self.tokenizer = base.tokenizer
        self.chunker = base.chunker
        self.batch_tokens = base.batch_tokens
        self.reserved_tokens = base.reserved_tokens
        self.dimension = base.dimension
        self._settings = {**base.settings(), "model_id": "null", "model_profile": "null"}
        self._vector = np.full(self.dimension, 1 / np.sqrt(self.dimension), dtype=np.float32)

        self.shape_policy = base.shape_policy
        self.shapes_met: Counter = Counter()
        self.padded_tokens = self.framed_tokens = 0

    batches = Embedder.batches
    _count_batch = Embedder._count_batch

    def embed(self, token_ids: Sequence[np.ndarray], on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
        if on_batch:
            on_batch(len(token_ids), sum(len(ids) for ids in token_ids))
        return np.broadcast_to(self._vector, (len(token_ids), self.dimension))

    def settings(self) -> dict[str, str]:
        return dict(self._settings)

    def runtime(self) -> dict[str, object]:
        return {}
