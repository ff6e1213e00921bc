"""Throughput on paper: a model's FLOPs per token and what a GPU should reach.

Used by ``make cost-estimate`` until a pod's ``make bench`` measures the real figure,
and by ``make bench`` to pace its stand-in GPU. The arithmetic is in docs/performance.md.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

# Dense fp16 tensor-core FLOP/s with fp32 accumulation, from the vendors' data sheets.
FP16_PEAK_FLOPS = {
    "NVIDIA GeForce RTX 4090": 165.2e12,
    "NVIDIA RTX A6000": 154.8e12,
    "NVIDIA L40S": 362.1e12,
}
# The share of that peak an encoder's forward pass keeps end to end (short sequences,
# attention, layer norms, host work): an expectation until a pod's `make bench` says.
EXPECTED_UTILISATION = 0.35
# The models' shapes, for FLOPs per token (flops_per_token).
MODEL_SHAPES = {
    "nomic": SimpleNamespace(n_embd=768, n_layer=12, n_inner=3072, activation_function="swiglu"),
    "minilm": SimpleNamespace(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, hidden_act="gelu"),
}


def flops_per_token(config: Any, sequence_length: float) -> float:
    """Forward FLOPs per token of a BERT-style encoder: 2 × the weights a token meets
    (attention projections and the MLP, three matrices for a gated MLP) plus the
    attention scores and mixing, which grow with the sequence length."""
    width = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
    activation = str(getattr(config, "activation_function", None) or getattr(config, "hidden_act", "")).lower()
    # nomic's config says swiglu; transformers' NomicBertConfig says silu for the same gated MLP.
    gated = "glu" in activation or getattr(config, "model_type", "") == "nomic_bert"
    mlp_matrices = 3 if gated else 2
    per_layer = 4 * width * width + mlp_matrices * width * inner
    return 2 * layers * per_layer + 4 * layers * sequence_length * width


def model_flops_per_token(model: str, sequence_length: float) -> float:
    """FLOPs per token of a profile's model, 0 when its shape is not known here."""
    return flops_per_token(MODEL_SHAPES[model], sequence_length) if model in MODEL_SHAPES else 0.0


def derived_tokens_per_second(gpu: str, model: str, sequence_length: float) -> float:
    """Expected tokens/s of ``model`` on ``gpu``: its fp16 peak x EXPECTED_UTILISATION /
    FLOPs per token; 0 when either is unknown."""
    flops = model_flops_per_token(model, sequence_length)
    return FP16_PEAK_FLOPS.get(gpu, 0.0) * EXPECTED_UTILISATION / flops if flops else 0.0
