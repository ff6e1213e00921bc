"""A stand-in for nomic-embed-text-v1.5: its published files with random weights.

nomic's weights are not on every machine that runs or measures (never on this project's
build machines, and a GPU lent for a measurement reaches no network). The stand-in is
production minus the weights: nomic's ``config.json`` (with its ``auto_map`` into remote
code that is never run), its tensor names, shapes and float32 in ``model.safetensors``,
its sentence-transformers files and the bert-base-uncased tokenizer files (taken from the
offline minilm package, which uses the same vocabulary). So it loads through exactly the
code the real model does (pipeline.core.model_loading) and costs what it costs per token.
Optionally it is written into a Hugging Face cache the way ``snapshot_download`` leaves
it, so ``--model nomic`` finds it with no ``--model-path``.

Its vectors mean nothing: what ``python -m pipeline model nomic --save-stand-in`` writes
carries a marker, every shard it makes records it, and verify, search and the importers
refuse such an output (``shard_file.refuse_stand_in``). Tests write the same layout
unmarked (``marked=False``) to run those on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.core import nomic_layout
from pipeline.core.profiles import offline_minilm_path, profile
from pipeline.errors import PipelineError

MARKER = "pipeline_stand_in.json"
STAND_IN_PROFILES = ("nomic",)


def _random_tensors(layers: int, seed: int) -> dict:
    """nomic's tensors with random values: layer norms near one, small weights, but
    queries and keys large enough that attention is sharp, as in a trained model (with
    nearly uniform attention, the positions, and so a wrong rotary embedding, would
    hardly change a vector)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in nomic_layout.published_tensors(layers).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith(("norm1.weight", "norm2.weight", "emb_ln.weight")):
            tensors[name] = 1 + 0.1 * noise
        else:
            tensors[name] = (0.08 if name.endswith("Wqkv.weight") else 0.02) * noise
    return tensors


def _write_files(target: Path, layers: int, seed: int, marked: bool) -> None:
    from safetensors.torch import save_file

    model_profile = profile("nomic")
    target.mkdir(parents=True, exist_ok=True)
    save_file(_random_tensors(layers, seed), str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "model.safetensors").chmod(0o644)  # safetensors writes 0600: unreadable to another user in an image
    config = dict(nomic_layout.PUBLISHED_CONFIG, n_layer=layers)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (target / "modules.json").write_text(json.dumps(nomic_layout.MODULES, indent=2))
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(json.dumps(nomic_layout.POOLING, indent=4))
    (target / "sentence_bert_config.json").write_text(json.dumps(nomic_layout.SENTENCE_BERT_CONFIG, indent=2))
    (target / "config_sentence_transformers.json").write_text(json.dumps(nomic_layout.CONFIG_SENTENCE_TRANSFORMERS, indent=2))
    minilm = Path(offline_minilm_path())
    shutil.copyfile(minilm / "vocab.txt", target / "vocab.txt")
    tokenizer = json.loads((minilm / "tokenizer.json").read_text())
    tokenizer.update(truncation=None, padding=None)  # minilm's own: cut and padded to 128
    (target / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tokenizer_config = json.loads((minilm / "tokenizer_config.json").read_text())
    tokenizer_config.pop("name_or_path", None)
    tokenizer_config["model_max_length"] = nomic_layout.TOKENIZER_MAX_LENGTH
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.copyfile(minilm / "special_tokens_map.json", target / "special_tokens_map.json")
    if marked:
        (target / MARKER).write_text(json.dumps({"stand_in_for": model_profile.model_id, "seed": seed, "layers": layers}))


def save_stand_in(folder: str, profile_name: str = "nomic", layers: int | None = None, seed: int = 0,
                  marked: bool = True, hf_home: bool = False) -> str:
    """Write ``profile_name``'s published layout with random weights to ``folder``,
    loadable with ``--model PROFILE --model-path FOLDER``; returns the model folder.

    Args:
        folder: where to write; with ``hf_home``, a Hugging Face home (``HF_HOME``) whose
            ``hub`` cache receives it as ``snapshot_download`` would.
        profile_name: the profile it stands in for (nomic only).
        layers: fewer layers than the model's 12 (tests); the config says how many.
        seed: of the random weights.
        marked: False leaves out the marker (tests that run verify and search on it).
        hf_home: write into a Hugging Face cache instead of a plain folder."""
    if profile_name not in STAND_IN_PROFILES:
        raise PipelineError(f"no stand-in for model profile {profile_name!r}; known: {', '.join(STAND_IN_PROFILES)}")
    layers = layers or nomic_layout.PUBLISHED_CONFIG["n_layer"]
    if not hf_home:
        _write_files(Path(folder), layers, seed, marked)
        return str(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        _write_files(Path(staging), layers, seed, marked)
        return _into_hub_cache(Path(staging), Path(folder) / "hub", profile(profile_name).model_id)


def _into_hub_cache(files: Path, cache: Path, model_id: str) -> str:
    """Files as the hub's cache keeps a repository: each file's content once under
    ``blobs`` (named by its hash), ``snapshots/<commit>/`` of links to them, and
    ``refs/main`` naming the commit. The commit is a hash of the contents."""
    repository = cache / f"models--{model_id.replace('/', '--')}"
    paths = sorted(p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file())
    digests = {path: hashlib.sha256((files / path).read_bytes()).hexdigest() for path in paths}
    commit = hashlib.sha1("".join(f"{path}:{digests[path]}\n" for path in paths).encode()).hexdigest()
    snapshot = repository / "snapshots" / commit
    (repository / "blobs").mkdir(parents=True, exist_ok=True)
    for path in paths:
        blob = repository / "blobs" / digests[path]
        if not blob.exists():
            os.replace(files / path, blob)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repository / "refs").mkdir(exist_ok=True)
    (repository / "refs" / "main").write_text(commit)
    return str(snapshot)


def stand_in_for(model_path: str) -> str | None:
    """The model id a folder stands in for, or None for real weights."""
    marker = Path(model_path) / MARKER
    return json.loads(marker.read_text())["stand_in_for"] if model_path and marker.is_file() else None
