"""nomic-embed-text-v1.5 as nomic publishes it, and how transformers' own NomicBert reads it.

nomic's repository on the Hugging Face hub holds a ``config.json`` in the key names of its
own modelling code (``n_embd``, ``n_layer``, ``rotary_emb_base``...) with an ``auto_map``
into ``nomic-ai/nomic-bert-2048``'s remote code, and weights in that code's tensor names
(``emb_ln``, ``encoder.layers.N.attn.Wqkv``, ``mlp.fc11``...). That remote code was written
for transformers 4 and fails under 5, so no remote code ever runs here: transformers
(5.5 and later) ships the architecture as ``model_type`` ``nomic_bert`` and renames the
tensors when it loads them (its ``conversion_mapping.py``). Its ``NomicBertConfig``,
though, reads only its own key names and silently takes its defaults for the rest: they
equal v1.5's, but a checkpoint of another shape (fewer layers, another width) would be
built at v1.5's shape with random weights where the checkpoint has none. So the loader
translates nomic's keys (``native_config``) and refuses what transformers' NomicBert
does not compute. Where each fact comes from: docs/schema.md, "nomic's published layout".
"""

from __future__ import annotations

from pipeline.errors import PipelineError

MODEL_TYPE = "nomic_bert"

# config.json of nomic-ai/nomic-embed-text-v1.5 (its keys and values as published).
PUBLISHED_CONFIG = {
    "activation_function": "swiglu",
    "architectures": ["NomicBertModel"],
    "attn_pdrop": 0.0,
    "auto_map": {
        "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
        "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
        "AutoModelForMaskedLM": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertForPreTraining",
    },
    "bos_token_id": None,
    "causal": False,
    "dense_seq_output": True,
    "embd_pdrop": 0.0,
    "eos_token_id": None,
    "fused_bias_fc": True,
    "fused_dropout_add_ln": True,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-12,
    "max_trained_positions": 2048,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "model_type": MODEL_TYPE,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": 3072,
    "n_layer": 12,
    "n_positions": 8192,
    "pad_vocab_size_multiple": 64,
    "parallel_block": False,
    "parallel_block_tied_norm": False,
    "prenorm": False,
    "qkv_proj_bias": False,
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.0,
    "rotary_emb_base": 1000,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "summary_activation": None,
    "summary_first_dropout": 0.0,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "torch_dtype": "float32",
    "transformers_version": "4.37.2",
    "type_vocab_size": 2,
    "use_cache": True,
    "use_flash_attn": True,
    "use_rms_norm": False,
    "use_xentropy": True,
    "vocab_size": 30528,
}

# The sentence-transformers files beside it: the encoder, then mean pooling (no Normalize
# module: the embedder normalises, after the Matryoshka cut where one is asked for).
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]
POOLING = {
    "word_embedding_dimension": 768,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
}
SENTENCE_BERT_CONFIG = {"max_seq_length": 8192, "do_lower_case": False}
CONFIG_SENTENCE_TRANSFORMERS = {"__version__": {"sentence_transformers": "2.4.0.dev0", "transformers": "4.37.2",
                                                "pytorch": "2.1.0+cu121"}}
# bert-base-uncased's tokenizer, with nomic's longer limit.
TOKENIZER_MAX_LENGTH = 8192

# nomic's key -> transformers' NomicBertConfig key.
RENAMED_KEYS = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_inner": "intermediate_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "vocab_size": "vocab_size",
    "type_vocab_size": "type_vocab_size",
}
# What transformers' NomicBert computes (rotary on the whole head, not interleaved, no
# scaling; SwiGLU; layer norm after attention and after the MLP; no biases but the
# norms'): a checkpoint that asks for anything else would give other vectors.
REQUIRED = {
    "activation_function": "swiglu",
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_scaling_factor": None,
    "rotary_emb_scale_base": None,
    "prenorm": False,
    "causal": False,
    "parallel_block": False,
    "qkv_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "use_rms_norm": False,
}


def published_tensors(layers: int = 12, width: int = 768, inner: int = 3072,
                      vocab: int = 30528) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in nomic's ``model.safetensors`` (float32, no prefix,
    no position embeddings: the positions are rotary)."""
    tensors = {
        "embeddings.word_embeddings.weight": (vocab, width),
        "embeddings.token_type_embeddings.weight": (2, width),
        "emb_ln.weight": (width,),
        "emb_ln.bias": (width,),
    }
    for n in range(layers):
        layer = f"encoder.layers.{n}"
        tensors.update({
            f"{layer}.attn.Wqkv.weight": (3 * width, width),  # rows: query, key, value
            f"{layer}.attn.out_proj.weight": (width, width),
            f"{layer}.mlp.fc11.weight": (inner, width),  # up
            f"{layer}.mlp.fc12.weight": (inner, width),  # gate: fc2(fc11(x) * silu(fc12(x)))
            f"{layer}.mlp.fc2.weight": (width, inner),
            f"{layer}.norm1.weight": (width,),
            f"{layer}.norm1.bias": (width,),
            f"{layer}.norm2.weight": (width,),
            f"{layer}.norm2.bias": (width,),
        })
    return tensors


def native_config(config: dict, where: str) -> dict:
    """The settings transformers' ``NomicBertConfig`` needs to build the model nomic's
    ``config`` describes (passed to it as overrides), or a ``PipelineError`` naming what
    transformers' NomicBert does not compute. A config already in transformers' names
    (a checkpoint saved by transformers 5) passes through; where both spellings are given
    they must agree."""
    wrong = {key: config[key] for key, value in REQUIRED.items() if key in config and config[key] != value}
    if wrong:
        settings = ", ".join(f"{key}={value!r}" for key, value in wrong.items())
        raise PipelineError(f"model at {where}: nomic_bert with {settings} is not what transformers' NomicBert computes "
                            f"(it needs {', '.join(f'{key}={REQUIRED[key]!r}' for key in wrong)}); refused")
    overrides = {native: config[nomic] for nomic, native in RENAMED_KEYS.items() if nomic in config}
    for nomic, native in RENAMED_KEYS.items():
        if nomic != native and nomic in config and native in config and config[native] != config[nomic]:
            raise PipelineError(f"model at {where}: config.json says {nomic}={config[nomic]!r} but {native}={config[native]!r}; "
                                "refused rather than guess which shape the weights have")
    if "rotary_emb_base" in config:
        theta = float(config["rotary_emb_base"])
        given = config.get("rope_parameters") or {}
        if given and (float(given.get("rope_theta", theta)) != theta or given.get("rope_type", "default") != "default"):
            raise PipelineError(f"model at {where}: config.json says rotary_emb_base={config['rotary_emb_base']!r} but "
                                f"rope_parameters={given!r}; refused rather than guess which positions the weights learned")
        overrides["rope_parameters"] = {**given, "rope_type": "default", "rope_theta": theta}
    width, heads = overrides.get("hidden_size", 768), overrides.get("num_attention_heads", 12)
    if width % heads:
        raise PipelineError(f"model at {where}: a width of {width} does not split into {heads} heads")
    # NomicBertConfig derives head_dim when it is built, before these overrides reach it.
    overrides["head_dim"] = config.get("head_dim") or width // heads
    return overrides
