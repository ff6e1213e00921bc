"""``--precision auto`` on a CPU: chosen by measuring the run's own batches, not assumed.

Whether bfloat16 beats float32 on a CPU depends on the CPU and on torch's kernels, and it
changes under us: on one kind of CPU with bf16 instructions it was 1.8x faster with one
torch and 0.6x as fast with the next (docs/performance.md). So where bf16 could help (a
CPU with bf16 instructions), the embedder runs one batch of the run's own shape in each
precision, keeps the fastest whose vectors agree with float32's to ``AGREEMENT``, and
says which and why in the log and in every shard's stats. The decision is kept per
machine, stack, model and shape in the user's cache folder, so a worker measures once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.core.embedder import Embedder

log = logging.getLogger("luigi-interface")

AGREEMENT = 0.9999  # the least cosine to float32's vector a reduced precision may give, for every vector
CANDIDATES = ("float32", "bfloat16")
SAMPLE_TEXT = ("Capital is money, capital is commodities; by virtue of it being value, it has acquired the occult "
               "ability to add value to itself. ")


def native_bf16_cpu() -> bool:
    """bfloat16 matrix instructions (AVX512-BF16 or AMX): the only CPUs where bf16 may win."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


@dataclass(frozen=True)
class Measured:
    """Each candidate's speed on the run's batch shape, and how its vectors agree with
    float32's (the least cosine over the batch)."""

    tokens_per_second: dict[str, float]
    agreement: dict[str, float]

    def choice(self) -> str:
        agreeing = [p for p in self.tokens_per_second if p == "float32" or self.agreement.get(p, 0.0) >= AGREEMENT]
        return max(agreeing, key=lambda p: self.tokens_per_second[p])

    def reason(self) -> str:
        speeds = ", ".join(f"{p} {self.tokens_per_second[p]:,.0f} tokens/s" for p in self.tokens_per_second)
        agreement = ", ".join(f"{p} to cosine {self.agreement[p]:.5f}" for p in self.agreement if p != "float32")
        return f"measured on this CPU: {speeds}; vectors agree with float32's: {agreement} (needed: {AGREEMENT})"


def measure_precisions(embedder: "Embedder") -> Measured:
    """One batch of the run's shape (``batch_tokens`` of chunks as long as the chunker
    makes them) in each candidate precision, after one untimed batch to warm it."""
    ids = embedder.token_ids([SAMPLE_TEXT * 64])[0]
    rows = max(1, embedder.batch_tokens // (len(ids) + embedder.reserved_tokens))
    batch = [np.roll(ids, row) for row in range(rows)]  # rows that differ, as a shard's do
    counters = (embedder.padded_tokens, embedder.framed_tokens, embedder.shapes_met.copy())
    chosen_before, speeds, vectors = embedder.precision, {}, {}
    try:
        for precision in CANDIDATES:
            embedder.precision = precision
            embedder.embed(batch)
            started = time.perf_counter()
            vectors[precision] = embedder.embed(batch)
            speeds[precision] = sum(map(len, batch)) / max(time.perf_counter() - started, 1e-9)
    finally:
        embedder.precision = chosen_before
        embedder.padded_tokens, embedder.framed_tokens, embedder.shapes_met = counters
    agreement = {p: float(np.min(np.sum(vectors[p] * vectors["float32"], axis=1))) for p in CANDIDATES}
    return Measured(speeds, agreement)


def choose_cpu_precision(embedder: "Embedder") -> tuple[str, str]:
    """(precision, why) for ``--precision auto`` on a CPU."""
    if not native_bf16_cpu():
        return "float32", "this CPU has no bfloat16 instructions"
    key = _cache_key(embedder)
    known = _read_cache().get(key)
    if known:
        return known["precision"], f"{known['reason']} (measured before, kept in {_cache_file()})"
    measured = measure_precisions(embedder)
    precision, reason = measured.choice(), measured.reason()
    _write_cache(key, {"precision": precision, "reason": reason})
    return precision, reason


def _cache_key(embedder: "Embedder") -> str:
    import torch
    import transformers

    cpu = ""
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        cpu = platform.processor()
    return (f"{cpu} x{os.cpu_count()} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"{embedder.profile.model_id} {embedder.weights_sha256} | {embedder.max_tokens} tokens, {embedder.batch_tokens} a batch")


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedding-pipeline" / "precision-choices.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, choice: dict) -> None:
    """Kept with an atomic replace, so workers that measure at once never leave half a file."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as staged:
            json.dump({**_read_cache(), key: choice}, staged, indent=2, sort_keys=True)
        os.replace(staged.name, path)
    except OSError as exc:  # a read-only home: measure again next time
        log.warning("could not keep the precision choice in %s: %s", path, exc)
