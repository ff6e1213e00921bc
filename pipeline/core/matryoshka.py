"""``--dimensions``: shorter vectors from a model trained for Matryoshka truncation.

nomic-embed-text-v1.5 is trained so that the first N values of its vector, taken after a
layer norm over the whole vector and normalised again, still embed well (its model card:
MTEB 62.28 at 768, 61.96 at 512, 61.04 at 256). A model not trained for it (minilm) would
lose meaning in ways nothing measures, so it is refused. The cut is the embedder's: a
query goes through it as a chunk does.
"""

from __future__ import annotations

from pipeline.core.profiles import PROFILES, ModelProfile
from pipeline.errors import PipelineError


def check_dimensions(model_profile: ModelProfile, dimensions: int) -> int:
    """``--dimensions``: 0 (the model's) or, for a model trained for it, a number in its
    range; what to cut to (0: nothing)."""
    if not dimensions or dimensions == model_profile.dimension and not model_profile.matryoshka_dimensions:
        return 0
    if not model_profile.matryoshka_dimensions:
        trained = ", ".join(name for name, p in PROFILES.items() if p.matryoshka_dimensions)
        raise PipelineError(f"model {model_profile.name} is not trained for shorter vectors (Matryoshka), so "
                            f"--dimensions {dimensions} would lose meaning; it works with: {trained}")
    fewest, most = model_profile.matryoshka_dimensions
    if not fewest <= dimensions <= most:
        raise PipelineError(f"--dimensions {dimensions} is outside what {model_profile.name} is trained for ({fewest} to {most})")
    return dimensions


def matryoshka(embeddings, dimensions: int):
    """Matryoshka truncation as nomic-embed-text-v1.5's authors do it: a layer norm over
    the whole vector, then its first ``dimensions`` values (normalised by the caller)."""
    import torch

    return torch.nn.functional.layer_norm(embeddings, normalized_shape=(embeddings.shape[1],))[:, :dimensions]
