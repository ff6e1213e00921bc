"""nomic-embed-text-v1.5's forward pass written from its published architecture, reading
its published tensor names: the check that transformers' NomicBert (which the pipeline
loads) computes what nomic's model computes, so a change in transformers can never change
production vectors unnoticed.

From nomic's config.json and modelling code (docs/schema.md, "nomic's published layout"):
word and token-type embeddings, a layer norm; per layer, attention with rotary position
embeddings (base ``rotary_emb_base``, on the whole head, halves rotated, not interleaved)
and a layer norm after it (``norm1``), then a SwiGLU MLP ``fc2(fc11(x) * silu(fc12(x)))``
and a layer norm after it (``norm2``); mean pooling over the real tokens; normalised.
Matryoshka (its model card): a layer norm over the pooled vector, its first N values,
normalised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def _layer_norm(x, weight=None, bias=None, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + eps)
    return normed if weight is None else normed * weight + bias


def _rotate(x, positions, base):
    """Rotary embedding on the whole head: the first half of each head's values paired
    with the second half, rotated by position × base^(-2i/d)."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(0, half, dtype=torch.float64) / half)
    angles = positions[:, None].double() * frequencies[None, :]
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def nomic_forward(model_folder: str, input_ids: list[list[int]], dimensions: int = 0) -> np.ndarray:
    """Normalised sentence vectors of each id sequence (no padding: one at a time)."""
    folder = Path(model_folder)
    config = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    heads, eps, base = config["n_head"], config["layer_norm_epsilon"], float(config["rotary_emb_base"])
    vectors = []
    for ids in input_ids:
        ids = torch.tensor(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["emb_ln.weight"], w["emb_ln.bias"], eps)
        positions = torch.arange(len(ids))
        for n in range(config["n_layer"]):
            p = f"encoder.layers.{n}."
            q, k, v = (x @ w[p + "attn.Wqkv.weight"].T).chunk(3, dim=-1)
            q, k, v = (t.reshape(len(ids), heads, -1).transpose(0, 1) for t in (q, k, v))  # heads, tokens, head dim
            q, k = _rotate(q, positions, base), _rotate(k, positions, base)
            attention = torch.softmax(q @ k.transpose(1, 2) / np.sqrt(q.shape[-1]), dim=-1) @ v
            attention = attention.transpose(0, 1).reshape(len(ids), -1) @ w[p + "attn.out_proj.weight"].T
            x = _layer_norm(x + attention, w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
            up, gate = x @ w[p + "mlp.fc11.weight"].T, x @ w[p + "mlp.fc12.weight"].T
            mlp = (up * torch.nn.functional.silu(gate)) @ w[p + "mlp.fc2.weight"].T
            x = _layer_norm(x + mlp, w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        pooled = x.mean(0)
        if dimensions:
            pooled = _layer_norm(pooled, eps=1e-5)[:dimensions]
        vectors.append((pooled / pooled.norm()).numpy())
    return np.stack(vectors)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)
