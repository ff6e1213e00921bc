"""``make bench``: where the time goes, measured side by side in one process.

Every figure comes from the same corpus, model, device and process, one after the
other, so the ratios hold on a noisy shared machine even when the absolute numbers
wander:

- baseline: plain ``SentenceTransformer.encode(texts, batch_size=32)`` over the chunk texts;
- embedder: our ``Embedder.embed`` over the same chunks;
- feed: the whole shard job with the model replaced by a null embedder (read, parse,
  chunk, tokenize, build and write Parquet), per CPU-second used;
- end to end: the real shard job, files to a published shard;
- stand-in GPU: the shard job with a model that sleeps as long as a 4090 is expected
  to work on each batch, leaving the CPU free: does our side keep such a GPU busy? With
  one reader thread, all in one thread, and with reader processes;
- utilisation: model FLOPs per token × tokens/s over a matrix-multiply peak measured here.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.batching import ShapePolicy
from pipeline.core.corpus import manifest_rows, write_manifest
from pipeline.core.profiles import PROFILES, profile as profile_of
from pipeline.core.precision_choice import measure_precisions
from pipeline.core.embedder import Embedder, default_batch_tokens
from pipeline.core.null_embedder import NullEmbedder
from pipeline.output.layout import OutputLayout
from pipeline.errors import PipelineError
from pipeline.core.stand_in import STAND_IN_PROFILES, save_stand_in
from pipeline.core.reader_pool import close_readers, read_in_processes, reader_processes
from pipeline.core.shard_job import ShardJob, read_pieces, run_shard
from pipeline.runpod.throughput import derived_tokens_per_second, flops_per_token

BASELINE_BATCH_SIZE = 32
# The stand-in GPU runs at what we expect of the production model on this GPU.
STAND_IN_GPU, STAND_IN_MODEL = "NVIDIA GeForce RTX 4090", "nomic"


class StandInGPU(NullEmbedder):
    """A GPU stand-in: each batch is framed and padded as ``Embedder.embed`` does, then
    takes ``padded tokens / tokens_per_second`` seconds in which this process's CPU is
    free, as it is while CUDA kernels run. Shows whether reading, chunking, tokenizing
    and writing keep a GPU of that speed busy, on a machine without one;
    ``busy_seconds`` over the wall time is the share of time the GPU would work.
    With ``overlap`` off the shard job runs everything in one thread, as on a CPU,
    which shows what reading ahead and writing behind are worth."""

    def __init__(self, base: Embedder, tokens_per_second: float, overlap: bool = True):
        super().__init__(base, overlap)
        self.features = base._features
        self.tokens_per_second = tokens_per_second
        self.batch_tokens = default_batch_tokens("cuda")
        self.shape_policy = ShapePolicy.for_device("cuda", base.max_tokens)
        self.busy_seconds = 0.0

    def embed(self, token_ids, on_batch=None):
        counts = [len(ids) for ids in token_ids]
        for batch in self.batches(counts):
            features = self.features([token_ids[i] for i in batch.indices], shape=batch.shape)
            real = self._count_batch(batch, counts, self.reserved_tokens)
            seconds = features["input_ids"].numel() / self.tokens_per_second
            time.sleep(seconds)
            self.busy_seconds += seconds
            if on_batch:
                on_batch(len(batch.indices), real)
        return super().embed(token_ids)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(function, *args, **kwargs) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, _cpu_seconds() - cpu


def matmul_peak(device: str, precision: str, seconds: float = 1.0) -> float:
    """FLOP/s of a large matrix multiply on ``device`` in the model's precision."""
    import torch

    size = 4096 if device.startswith("cuda") else 1024
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b)
        runs += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def warm_readers(corpus: str, manifest: str, embedder, processes: int) -> None:
    """Start the reader processes before timing, as a worker has them from its first shard."""
    list(read_in_processes(corpus, manifest_rows(manifest, 0)[:processes], embedder.tokenizer, embedder.chunker, processes))


def chunk_corpus(corpus: str, manifest: str, embedder) -> tuple[list[str], list]:
    """Texts and token ids of the chunks the shard job would embed."""
    pieces = list(read_pieces(corpus, manifest_rows(manifest, 0), embedder, [], Counter()))
    return ([text for piece in pieces for text in piece.chunks.column("text").to_pylist()],
            [ids for piece in pieces for ids in piece.token_id_list()])


def baseline_against_embedder(embedder: Embedder, texts: list[str], token_ids: list, rounds: int) -> dict[str, Any]:
    """The baseline, our embedder, and our embedder with batches as wide as their
    longest chunk (as before batch shapes were bucketed) in alternating rounds, each on
    an interleaved part of the chunks (every part has the corpus's mix of lengths), the
    order turned each round: a machine that speeds up or slows down over the minutes of
    a run then affects all alike. Ratios are the medians of the rounds' ratios."""
    prefixed = [embedder.profile.prefix + text for text in texts]
    warm = slice(0, min(64, len(texts)))
    embedder.model.encode(prefixed[warm], batch_size=BASELINE_BATCH_SIZE)
    embedder.embed(token_ids[warm])
    baseline_vectors = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
    vectors = np.zeros_like(baseline_vectors)
    bucketed = embedder.shape_policy

    def run_baseline(part: list[int]) -> None:
        baseline_vectors[part] = embedder.model.encode([prefixed[i] for i in part], batch_size=BASELINE_BATCH_SIZE,
                                                       normalize_embeddings=True, convert_to_numpy=True)

    def run_embedder(part: list[int]) -> None:
        vectors[part] = embedder.embed([token_ids[i] for i in part])

    def run_exact_widths(part: list[int]) -> None:
        embedder.shape_policy = ShapePolicy()
        try:
            embedder.embed([token_ids[i] for i in part])
        finally:
            embedder.shape_policy = bucketed

    runs = {"baseline": run_baseline, "embedder": run_embedder, "exact": run_exact_widths}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    ratios, bucketing = [], []
    rounds = max(1, min(rounds, len(texts)))
    for number in range(rounds):
        part = list(range(number, len(texts), rounds))
        names = list(runs)[number % 3:] + list(runs)[: number % 3]
        for name in (names if number % 2 == 0 else names[::-1]):
            _, wall, _ = _timed(runs[name], part)
            seconds[name].append(wall)
        ratios.append(seconds["baseline"][-1] / seconds["embedder"][-1])
        bucketing.append(seconds["exact"][-1] / seconds["embedder"][-1])
    return {"baseline_vectors": baseline_vectors, "vectors": vectors, "baseline_s": sum(seconds["baseline"]),
            "embedder_s": sum(seconds["embedder"]), "ratios": ratios, "bucketing_ratios": bucketing}


def bench_model_path(profile: str, model_path: str, work: str) -> str:
    """The model folder to measure: the one given, the profile's weights where they are
    here, else a stand-in in the profile's published layout with random weights, built in ``work``."""
    if model_path:
        return model_path
    try:
        return PROFILES[profile].locate()
    except PipelineError:
        if profile not in STAND_IN_PROFILES:
            raise
        return save_stand_in(f"{work}/stand-in", profile)


def run_bench(corpus: str, profile: str, device: str, batch_tokens: int, precision: str = "auto",
              pattern: str = "*.md", rounds: int = 3, model_path: str = "") -> dict[str, Any]:
    """Every measurement of ``make bench`` on one corpus, side by side in this process.

    Args:
        corpus: the documents measured (a folder or bucket prefix).
        profile: the model profile (``minilm``, ``nomic``).
        device: ``cpu``, ``cuda``, ``auto``...
        batch_tokens: padded tokens per batch; 0 picks by device.
        precision: as ``--precision``.
        pattern: which files are documents.
        rounds: timed passes of each measurement; the median counts.
        model_path: a local model folder (a stand-in's) instead of the profile's.

    Returns the figures ``format_table`` prints and ``--json`` writes.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as work:
        embedder = Embedder(profile_of(profile), bench_model_path(profile, model_path, work), device, 0, batch_tokens, precision)
        manifest = OutputLayout.of(work).manifest
        documents = write_manifest(corpus, pattern, 10**9, manifest)  # one shard: the whole corpus
        texts, token_ids = chunk_corpus(corpus, manifest, embedder)
        tokens = [len(ids) for ids in token_ids]
        total = sum(tokens)
        compared = baseline_against_embedder(embedder, texts, token_ids, rounds)
        side_by_side = None if embedder.on_cuda else measure_precisions(embedder)
        baseline_vectors, vectors = compared["baseline_vectors"], compared["vectors"]
        baseline_s, embedder_s = compared["baseline_s"], compared["embedder_s"]
        # The feed is short: run it in rounds too, and take the median CPU time.
        feed_runs = [_timed(run_shard, ShardJob(corpus, manifest, f"{work}/null-{number}", 1), 0, NullEmbedder(embedder))
                     for number in range(max(1, rounds))]
        feed_cpu = float(np.median([cpu for _, _, cpu in feed_runs]))
        feed_s = float(np.median([wall for _, wall, _ in feed_runs]))
        embedder.shapes_met.clear()
        embedder.padded_tokens = embedder.framed_tokens = 0
        _, end_to_end_s, _ = _timed(run_shard, ShardJob(corpus, manifest, f"{work}/real", 1), 0, embedder)
        shapes = {"shapes": len(embedder.shapes_met), "padding": embedder.padded_tokens / max(embedder.framed_tokens, 1)}
        sequence = float(np.mean(tokens)) + embedder.reserved_tokens if tokens else 0.0
        pace = derived_tokens_per_second(STAND_IN_GPU, STAND_IN_MODEL, sequence)
        in_turn = StandInGPU(embedder, pace, overlap=False)
        _, in_turn_s, _ = _timed(run_shard, ShardJob(corpus, manifest, f"{work}/stand-in-in-turn", 1), 0, in_turn)
        stand_in = StandInGPU(embedder, pace)
        _, stand_in_s, _ = _timed(run_shard, ShardJob(corpus, manifest, f"{work}/stand-in", 1), 0, stand_in)
        # Reader processes as a worker on a GPU starts them (once, before its first shard):
        # the feed with one per core against one reader thread, then the stand-in GPU.
        cores = os.cpu_count() or 1
        warm_readers(corpus, manifest, embedder, cores)
        _, feed_readers_s, _ = _timed(run_shard, ShardJob(corpus, manifest, f"{work}/null-readers", 1, readers=cores), 0,
                                      NullEmbedder(embedder, overlap=True))
        _, feed_thread_s, _ = _timed(run_shard, ShardJob(corpus, manifest, f"{work}/null-thread", 1), 0,
                                     NullEmbedder(embedder, overlap=True))
        readers = reader_processes(-1, runs_off_cpu=True)
        warm_readers(corpus, manifest, embedder, readers)
        with_readers = StandInGPU(embedder, pace)
        _, with_readers_s, worker_cpu_s = _timed(run_shard, ShardJob(corpus, manifest, f"{work}/stand-in-readers", 1, readers=readers),
                                                 0, with_readers)
        close_readers()

    config = embedder.model[0].auto_model.config
    embedder_rate = total / embedder_s
    peak = matmul_peak(embedder.device, embedder.precision)
    return {
        "corpus": str(corpus),
        "documents": documents,
        "chunks": len(texts),
        "tokens": total,
        "model": embedder.profile.model_id,
        "stand_in_for": embedder.stand_in_for,
        "device": embedder.device,
        "precision": embedder.precision,
        "precision_choice": embedder.precision_reason,
        # Both precisions on this machine's CPU, side by side (what --precision auto measures).
        **({"precision_tokens_per_s": side_by_side.tokens_per_second, "precision_agreement": side_by_side.agreement}
           if side_by_side else {}),
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "batch_tokens": embedder.batch_tokens,
        "baseline_tokens_per_s": total / baseline_s,
        "embedder_tokens_per_s": embedder_rate,
        "embedder_vs_baseline": float(np.median(compared["ratios"])),
        "embedder_vs_baseline_rounds": compared["ratios"],
        "bucketed_vs_exact_widths": float(np.median(compared["bucketing_ratios"])),
        "bucketed_vs_exact_widths_rounds": compared["bucketing_ratios"],
        "batch_shapes": shapes["shapes"],
        "padded_vs_real_tokens": shapes["padding"],
        "stand_in_batch_shapes": len(stand_in.shapes_met),
        "stand_in_padded_vs_real_tokens": stand_in.padded_tokens / max(stand_in.framed_tokens, 1),
        "stand_in_batch_tokens": stand_in.batch_tokens,
        "feed_rounds": len(feed_runs),
        "max_abs_difference_vs_baseline": float(np.max(np.abs(vectors - baseline_vectors))) if len(texts) else 0.0,
        "min_cosine_vs_baseline": float(np.min(np.sum(vectors * baseline_vectors, axis=1))) if len(texts) else 1.0,
        "feed_tokens_per_s_per_core": total / feed_cpu,
        "feed_wall_tokens_per_s": total / feed_s,
        "end_to_end_tokens_per_s": total / end_to_end_s,
        "end_to_end_vs_embedder": (total / end_to_end_s) / embedder_rate,
        "stand_in_gpu": f"{STAND_IN_GPU} running {STAND_IN_MODEL}",
        "stand_in_gpu_tokens_per_s": stand_in.tokens_per_second,
        "stand_in_end_to_end_tokens_per_s": total / stand_in_s,
        "stand_in_gpu_busy": stand_in.busy_seconds / stand_in_s,
        "stand_in_in_turn_end_to_end_tokens_per_s": total / in_turn_s,
        "stand_in_in_turn_gpu_busy": in_turn.busy_seconds / in_turn_s,
        "stand_in_overlap_vs_in_turn": in_turn_s / stand_in_s,
        "feed_reader_processes": cores,
        "feed_readers_wall_tokens_per_s": total / feed_readers_s,
        "feed_readers_vs_one_reader_thread": feed_thread_s / feed_readers_s,
        "stand_in_reader_processes": readers,
        "stand_in_readers_end_to_end_tokens_per_s": total / with_readers_s,
        "stand_in_readers_gpu_busy": with_readers.busy_seconds / with_readers_s,
        "stand_in_readers_vs_one_reader_thread": stand_in_s / with_readers_s,
        "worker_cpu_us_per_token_with_readers": worker_cpu_s / total * 1e6 if total else 0.0,
        "flops_per_token": flops_per_token(config, sequence),
        "matmul_peak_flops": peak,
        "utilisation": flops_per_token(config, sequence) * embedder_rate / peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def format_table(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"corpus {r['corpus']}: {r['documents']} documents, {r['chunks']} chunks, {r['tokens']:,} tokens",
        f"model {r['model']} on {r['device']} ({r['precision']}), {r['torch_threads']} torch threads of {r['cpu_cores']} cores, "
        f"batches of {r['batch_tokens']} tokens",
        *(["precision on this CPU: " + ", ".join(f"{p} {v:,.0f} tokens/s" for p, v in r["precision_tokens_per_s"].items())
           + f" (bfloat16 ÷ float32 {r['precision_tokens_per_s']['bfloat16'] / r['precision_tokens_per_s']['float32']:.2f}, "
           f"vectors agree to cosine {r['precision_agreement']['bfloat16']:.5f}); this run: {r['precision']}, "
           f"{r['precision_choice']}"] if "precision_tokens_per_s" in r else []),
        "",
        f"{'measure':<44} {'tokens/s':>12}  ratio",
        f"{'baseline: encode(batch_size=32)':<44} {r['baseline_tokens_per_s']:>12,.0f}  1.00",
        f"{'our embedder':<44} {r['embedder_tokens_per_s']:>12,.0f}  {r['embedder_vs_baseline']:.2f} × baseline "
        f"(median of {len(r['embedder_vs_baseline_rounds'])} alternating rounds: "
        f"{', '.join(f'{x:.2f}' for x in r['embedder_vs_baseline_rounds'])})",
        f"{'our embedder, batches as wide as their longest':<44} {'':>12}  "
        f"{1 / r['bucketed_vs_exact_widths']:.2f} × our embedder (bucketed widths are "
        f"{r['bucketed_vs_exact_widths']:.2f} × as fast; rounds: {', '.join(f'{x:.2f}' for x in r['bucketed_vs_exact_widths_rounds'])})",
        f"{'feed (null model), per CPU core':<44} {r['feed_tokens_per_s_per_core']:>12,.0f}  median of {r['feed_rounds']} runs",
        f"{'feed, ' + str(r['feed_reader_processes']) + ' reader process(es), wall':<44} {r['feed_readers_wall_tokens_per_s']:>12,.0f}  "
        f"{r['feed_readers_vs_one_reader_thread']:.2f} × one reader thread",
        f"{'end to end, files to published shard':<44} {r['end_to_end_tokens_per_s']:>12,.0f}  {r['end_to_end_vs_embedder']:.2f} × embedder",
        f"{'end to end, stand-in GPU (see below)':<44} {r['stand_in_end_to_end_tokens_per_s']:>12,.0f}  "
        f"GPU busy {r['stand_in_gpu_busy']:.0%} of the time, {r['stand_in_overlap_vs_in_turn']:.2f} × in one thread",
        f"{'end to end, stand-in GPU, all in one thread':<44} {r['stand_in_in_turn_end_to_end_tokens_per_s']:>12,.0f}  "
        f"GPU busy {r['stand_in_in_turn_gpu_busy']:.0%} of the time",
        f"{'end to end, stand-in GPU, ' + str(r['stand_in_reader_processes']) + ' reader process(es)':<44} "
        f"{r['stand_in_readers_end_to_end_tokens_per_s']:>12,.0f}  GPU busy {r['stand_in_readers_gpu_busy']:.0%} of the time, "
        f"{r['stand_in_readers_vs_one_reader_thread']:.2f} × one reader thread",
        "",
        f"batch shapes: this run (end to end) met {r['batch_shapes']} distinct shapes, padded ÷ real tokens "
        f"{r['padded_vs_real_tokens']:.3f}; on a GPU ({r['stand_in_batch_tokens']}-token batches, the stand-in run) "
        f"{r['stand_in_batch_shapes']} shapes, {r['stand_in_padded_vs_real_tokens']:.3f}",
        f"worker process CPU per token fed by {r['stand_in_reader_processes']} reader process(es): "
        f"{r['worker_cpu_us_per_token_with_readers']:.3f} µs (a ceiling of "
        f"{1 / max(r['worker_cpu_us_per_token_with_readers'], 1e-9):,.1f} M tokens/s)",
        f"vectors vs baseline (fp32 encode): max |difference| {r['max_abs_difference_vs_baseline']:.2e}, "
        f"min cosine {r['min_cosine_vs_baseline']:.6f}",
        f"utilisation: {r['flops_per_token'] / 1e6:.1f} MFLOP/token × {r['embedder_tokens_per_s']:,.0f} tokens/s "
        f"/ {r['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s matmul peak = {r['utilisation']:.1%}",
        f"stand-in GPU: batches sleep for padded tokens / {r['stand_in_gpu_tokens_per_s']:,.0f} tokens/s, "
        f"the {r['stand_in_gpu']} expected (docs/performance.md)",
        f"peak RSS of this process (a worker's upper bound): {r['peak_rss_bytes'] / 2**20:,.0f} MiB",
    ]
    if r.get("stand_in_for"):  # no figure of a stand-in may pass for the real model's
        lines = [f"[stand-in for {r['stand_in_for']}: its published layout, random weights] {line}" if line else line for line in lines]
    return "\n".join(lines)


def bench(corpus: str, profile: str, device: str, batch_tokens: int, precision: str = "auto", json_path: str = "",
          rounds: int = 3, model_path: str = "") -> str:
    """``run_bench``'s table, its figures also written to ``json_path`` when given;
    the other arguments are ``run_bench``'s."""
    result = run_bench(corpus, profile, device, batch_tokens, precision, rounds=rounds, model_path=model_path)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return format_table(result)
