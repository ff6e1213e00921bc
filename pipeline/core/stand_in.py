"""A stand-in for a production model: its shape with random weights, for throughput only.

nomic-embed-text-v1.5's weights are not on every machine that measures (never on this
project's build machines, and a GPU lent for a measurement reaches no network), but its
cost per token is what a run pays for. The stand-in is a BERT encoder of nomic's width,
depth and heads, with an MLP of 4,608 so that its FLOPs per token equal nomic's SwiGLU
MLP of 3,072 (137.8 M parameters), and the bert-base-uncased vocabulary nomic uses,
taken from the tokenizer files the offline minilm package ships. Its vectors mean
nothing: its folder carries a marker, every shard it makes records it, and verify,
search and the importers refuse such an output (``shards.refuse_stand_in``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.profiles import offline_minilm_path, profile
from pipeline.errors import PipelineError

MARKER = "pipeline_stand_in.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# Profiles a stand-in can be made for: the encoder shape that costs what the model costs.
SHAPES = {"nomic": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 4608}}


def save_stand_in(folder: str, profile_name: str = "nomic", layers: int | None = None, seed: int = 0) -> str:
    """Write a sentence-transformers folder with ``profile_name``'s shape and random
    weights (fp16 on disk; the embedder sets its own precision), loadable with
    ``--model PROFILE --model-path FOLDER``. ``layers``: fewer layers (tests)."""
    import torch
    from transformers import BertConfig, BertModel

    if profile_name not in SHAPES:
        raise PipelineError(f"no stand-in shape for model profile {profile_name!r}; known: {sorted(SHAPES)}")
    model_profile = profile(profile_name)
    shape = dict(SHAPES[profile_name], **({"num_hidden_layers": layers} if layers else {}))
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, max_position_embeddings=model_profile.max_tokens or 512, **shape)
    BertModel(config).half().save_pretrained(target)
    minilm = Path(offline_minilm_path())
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm / name, target / name)
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": shape["hidden_size"],
                                                                   "pooling_mode_mean_tokens": True}))
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": config.max_position_embeddings,
                                                                  "do_lower_case": False}))
    (target / MARKER).write_text(json.dumps({"stand_in_for": model_profile.model_id, "seed": seed, **shape}))
    return str(target)


def stand_in_for(model_path: str) -> str | None:
    """The model id a folder stands in for, or None for real weights."""
    marker = Path(model_path) / MARKER
    return json.loads(marker.read_text())["stand_in_for"] if model_path and marker.is_file() else None
