"""Batch shapes: few on a GPU (each warmed once), exact enough on a CPU, and never a
change to the vectors."""

import random

import numpy as np
import pytest

from pipeline.core.batching import ShapePolicy, batch_widths, plan_batches


def test_widths_step_finely_where_chunks_are_short_and_end_at_the_limit():
    assert batch_widths(256, 16) == tuple(range(16, 257, 16))
    widths = batch_widths(512, 16)
    assert widths[:16] == tuple(range(16, 257, 16)) and widths[16:] == tuple(range(288, 513, 32))
    assert batch_widths(100, 16)[-1] == 100 and batch_widths(2048, 16)[-1] == 2048
    assert all(a < b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize("policy", [ShapePolicy(), ShapePolicy.for_device("cpu", 256), ShapePolicy.for_device("cuda", 256)])
def test_every_chunk_is_batched_once_within_the_budget_at_a_width_that_holds_it(policy):
    rng = random.Random(7)
    counts = [rng.choice([3, 40, 100, 180, 253]) + rng.randrange(2) for _ in range(500)] + [254, 1]
    batches = plan_batches(counts, 2, 1000, policy)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(counts)))
    for batch in batches:
        assert len(batch.indices) <= batch.rows and batch.rows * batch.width <= 1000
        assert max(counts[i] for i in batch.indices) + 2 <= batch.width
        if policy.widths:
            assert batch.width in policy.widths


def test_a_gpu_run_meets_few_shapes_and_little_padding():
    rng = random.Random(11)
    policy = ShapePolicy.for_device("cuda", 512)
    shapes, padded, real = set(), 0, 0
    for _ in range(40):  # forty groups of about a million tokens, as a run's groups are
        counts = [rng.randrange(1, 511) for _ in range(rng.randrange(3000, 5000))]
        for batch in plan_batches(counts, 2, 16384, policy):
            shapes.add(batch.shape)
            padded += batch.rows * batch.width
            real += sum(counts[i] + 2 for i in batch.indices)
    full_shapes = {(16384 // w, w) for w in policy.widths}
    assert len(shapes - full_shapes) <= 40  # only each group's last batch is short, rounded to a power of two
    assert len(shapes) <= 64 and padded / real < 1.10
    exact = {b.shape for b in plan_batches([rng.randrange(1, 511) for _ in range(2000)], 2, 16384, ShapePolicy())}
    assert len(exact) > len(shapes)


def test_short_batches_round_their_rows_up_to_a_power_of_two_on_a_gpu_only():
    gpu, cpu = ShapePolicy.for_device("cuda", 256), ShapePolicy.for_device("cpu", 256)
    assert [gpu.rows(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert gpu.rows(40, 51) == 51 and cpu.rows(5, 64) == 5


def test_padding_rows_and_coarse_widths_leave_the_vectors_as_encode_makes_them(embedder, monkeypatch):
    texts = ["Labour is the source of all wealth.", "A spectre is haunting Europe. " * 12, "Value", "Capital " * 70, "x y z"]
    ids = embedder.token_ids(texts)
    monkeypatch.setattr(embedder, "shape_policy", ShapePolicy(batch_widths(embedder.max_tokens, 64), round_rows=True))
    monkeypatch.setattr(embedder, "batch_tokens", 512)
    before = embedder.padded_tokens
    ours = embedder.embed(ids)
    theirs = embedder.model.encode(texts, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-5
    assert embedder.padded_tokens - before > sum(len(i) + 2 for i in ids)  # rows and widths were padded


def test_warm_up_runs_every_full_shape_a_run_meets(embedder, monkeypatch):
    monkeypatch.setattr(embedder, "shape_policy", ShapePolicy(batch_widths(64, 32), round_rows=True))
    monkeypatch.setattr(embedder, "batch_tokens", 256)
    warmed = embedder.warm_up()
    assert warmed == {(8, 32), (4, 64)}
    met = {b.shape for b in embedder.batches([30] * 9 + [62] * 4)}
    assert {(8, 32), (4, 64)} <= met and met - warmed == {(1, 32)}  # the short last batch
