"""Model loading and batched encoding.

The model is loaded once per worker process (``load_embedder`` is cached) and
nothing is ever downloaded: hub access is switched off before the libraries load
(``profiles.offline_model_hub``, when the first model loads, not on import).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.core.batching import Batch, ShapePolicy, plan_batches
from pipeline.core.chunking import chunk_budget, plain_tokenizer
from pipeline.core.matryoshka import check_dimensions, matryoshka
from pipeline.core.model_loading import check_stack, load_sentence_transformer
from pipeline.core.profiles import ModelProfile, download_model, offline_model_hub, profile
from pipeline.errors import PipelineError
from pipeline.core.precision_choice import choose_cpu_precision
from pipeline.core.stand_in import stand_in_for
from pipeline.settings import default

log = logging.getLogger("luigi-interface")


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device} was asked for but no CUDA GPU is visible")
    return device


PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def default_batch_tokens(device: str) -> int:
    """Padded tokens per batch when none is given: a GPU needs big batches to fill it;
    a CPU runs faster on small ones that stay in cache (figures in docs/performance.md)."""
    return 16384 if device.startswith("cuda") else 4096


def pick_precision(precision: str, device: str, model_profile: ModelProfile) -> str:
    """``auto``: fp16 on CUDA (where the profile allows it); on a CPU, fp32 until the
    loaded model measures whether bf16 is faster there (``precision_choice``). Reduced
    precision changes vectors slightly (cosine to fp32 above 0.9999, tested), and every
    shard records which it used."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if precision == "auto":
        return "float16" if cuda and model_profile.fp16_on_cuda else "float32"
    if precision == "float16" and not cuda:
        raise PipelineError("float16 needs a CUDA device; on a CPU use bfloat16 or float32")
    return precision


class Embedder:
    """A sentence-transformers model with the settings that give its vectors meaning."""

    def __init__(self, model_profile: ModelProfile, model_path: str, device: str, max_tokens: int, batch_tokens: int,
                 precision: str = "auto", dimensions: int = 0):
        offline_model_hub()  # before the libraries load: they read it once
        check_stack()  # one line, before anything this Python or these packages cannot do
        self.profile = model_profile
        self.truncate_to = check_dimensions(model_profile, dimensions)
        self.device = _pick_device(device)
        path = model_path or model_profile.locate()
        self.weights_sha256 = weights_fingerprint(path)
        self.stand_in_for = stand_in_for(path)
        if self.stand_in_for:
            log.warning("model at %s is a stand-in for %s: random weights, for measuring throughput only; verify, search "
                        "and the importers refuse what it makes", path, self.stand_in_for)
        log.info("loading model %s from %s on %s", model_profile.model_id, path, self.device)
        self.model = load_sentence_transformer(path, self.device)
        # Set precision explicitly: transformers loads a checkpoint in its stored dtype,
        # so fp16 weights would otherwise run in fp16 while the shards say float32.
        # bfloat16 runs under autocast (fp32 weights; norms and softmax stay fp32).
        self.precision = pick_precision(precision, self.device, model_profile)
        if self.precision == "float16":
            self.model.half()
        else:
            self.model.float()
        dimension = self.model.get_embedding_dimension()
        if dimension != model_profile.dimension:
            raise PipelineError(
                f"model at {path} gives {dimension}-dimensional vectors; profile "
                f"{model_profile.name} expects {model_profile.dimension}"
            )
        model_limit = int(self.model.max_seq_length)
        wanted = max_tokens or model_profile.max_tokens or model_limit
        if wanted > model_limit:
            raise PipelineError(f"max_tokens {wanted} exceeds the model's max_seq_length {model_limit}")
        self.max_tokens = wanted
        self.model.max_seq_length = wanted
        self.batch_tokens = batch_tokens or default_batch_tokens(self.device)
        self.tokenizer = plain_tokenizer(self.model.tokenizer.backend_tokenizer)
        self.chunker, self.reserved_tokens = chunk_budget(self.tokenizer, wanted, model_profile.prefix)
        self._head, self._tail = self._template()
        self._pad_id = self.model.tokenizer.pad_token_id or 0
        self._type_ids = "token_type_ids" in self._model_tokenize(["a"])
        self._check_template()
        # Other prefixes (a query's) get their own frame, made and checked on first use.
        self._frames: dict[str, tuple[np.ndarray, np.ndarray]] = {model_profile.prefix: (self._head, self._tail)}
        self.shape_policy = ShapePolicy.for_device(self.device, wanted)
        self.shapes_met: Counter = Counter()  # (rows, width) of each batch run: `make bench` counts them
        self.padded_tokens = self.framed_tokens = 0  # what the batches held, and how much of it was real
        self.precision_reason = f"--precision {precision}" if precision != "auto" else "auto on CUDA"
        if precision == "auto" and not self.on_cuda:
            self.precision, self.precision_reason = choose_cpu_precision(self)
            log.info("precision auto on this CPU: %s (%s)", self.precision, self.precision_reason)
        if self.on_cuda:
            self.warm_up()

    @property
    def dimension(self) -> int:
        """Of the vectors it gives: the model's, or ``--dimensions``'s."""
        return self.truncate_to or self.profile.dimension

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def runs_off_cpu(self) -> bool:
        """Whether the model runs off the CPU (a GPU), leaving the CPU free: reading and
        writing can then overlap it without slowing it."""
        return not self.device.startswith("cpu")

    def batches(self, token_counts: Sequence[int], frame_tokens: int | None = None) -> list[Batch]:
        """Indices grouped longest first into batches of this embedder's shapes, each
        within ``batch_tokens`` (``frame_tokens``: what the frame adds to each chunk;
        the document prefix's by default)."""
        frame = self.reserved_tokens if frame_tokens is None else frame_tokens
        return plan_batches(token_counts, frame, self.batch_tokens, self.shape_policy)

    def warm_up(self) -> set[tuple[int, int]]:
        """Run each full batch shape once, so a run's first pass meets no new shape (on a
        GPU the first batch of a shape pays its set-up; done at load there). A shape too
        big for the device lowers the budget, as a batch in a run would. Returns the
        shapes run."""
        import torch

        warmed = set()
        for width in self.shape_policy.widths:
            while True:
                rows = max(1, self.batch_tokens // width)
                features = self._features([np.zeros(0, dtype=np.int64)], shape=(rows, width))
                try:
                    with torch.inference_mode(), self._autocast():
                        self.model(self._to_device(features))
                    warmed.add((rows, width))
                    break
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    features = None
                    self._lower_budget(rows, width, error)
        if self.on_cuda:
            torch.cuda.synchronize()
        return warmed

    def _template(self, prefix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ids the model's tokenizer puts before a text (special tokens, then the
        prefix: the profile's document prefix unless another is given) and after it, so
        chunk ids can be framed as ``encode`` would frame them."""
        prefix = self.profile.prefix if prefix is None else prefix
        framed = self.tokenizer.encode(prefix + "a", add_special_tokens=True)
        specials = framed.special_tokens_mask
        lead = next(i for i, special in enumerate(specials) if not special)
        trail = len(specials) - next(i for i, special in enumerate(reversed(specials)) if not special)
        prefix_ids = self.tokenizer.encode(prefix, add_special_tokens=False).ids
        head = framed.ids[:lead] + prefix_ids
        return np.array(head, dtype=np.int64), np.array(framed.ids[trail:], dtype=np.int64)

    def _frame(self, prefix: str | None) -> tuple[np.ndarray, np.ndarray]:
        """The (head, tail) ids for a prefix; ``None`` is the document prefix. A new
        prefix is checked against the model's tokenizer once, like the document one."""
        if prefix is None:
            return self._head, self._tail
        if prefix not in self._frames:
            frame = self._template(prefix)
            self._check_template(prefix, frame)
            self._frames[prefix] = frame
        return self._frames[prefix]

    def _check_template(self, prefix: str | None = None,
                        frame: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Chunk ids framed by the template must be what the model's own tokenizer gives
        for prefix + text, or vectors would differ from the model's. Checked once per
        prefix: the document prefix here, at load."""
        prefix = self.profile.prefix if prefix is None else prefix
        frame = frame or (self._head, self._tail)
        sample = "Capital, Volume I. Chapter 1: Commodities — § 1, the two factors."
        ours = self._features([self.token_ids([sample])[0]], frame)["input_ids"][0].tolist()
        theirs = self._model_tokenize([prefix + sample])["input_ids"][0].tolist()
        if ours != theirs:
            raise PipelineError(f"model {self.profile.model_id}: chunk token ids framed for the model differ from its tokenizer's "
                                f"({ours[:8]}… against {theirs[:8]}…); this tokenizer is not supported")

    def _model_tokenize(self, texts: list[str]) -> dict:
        """The model's own tokenization, as ``encode`` does it (``preprocess`` from
        sentence-transformers 6, ``tokenize`` before)."""
        return (getattr(self.model, "preprocess", None) or self.model.tokenize)(texts)

    def token_ids(self, texts: Sequence[str], limit: int | None = None) -> list[np.ndarray]:
        """Token ids of texts as the chunker makes them, cut to the chunk budget (as
        ``encode`` truncates), or to ``limit``: for texts that do not come from the
        chunker (queries)."""
        limit = self.chunker.max_tokens if limit is None else limit
        return [np.array(e.ids[:limit], dtype=np.int32) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _features(self, group: Sequence[np.ndarray], frame: tuple[np.ndarray, np.ndarray] | None = None,
                  shape: tuple[int, int] | None = None) -> dict:
        """One padded batch for the model: each chunk's ids framed by the template
        (the document prefix's, unless another ``frame`` is given), padded to ``shape``
        (rows, width) where one is given; rows beyond the chunks repeat the first (a row
        with nothing to attend to would make NaNs) and their vectors are dropped."""
        import torch

        head, tail = frame or (self._head, self._tail)
        lengths = np.fromiter((len(ids) for ids in group), dtype=np.int64, count=len(group)) + len(head) + len(tail)
        rows, width = shape or (len(group), int(lengths.max()))
        input_ids = np.full((rows, width), self._pad_id, dtype=np.int64)
        input_ids[: len(group), : len(head)] = head
        for row, ids in enumerate(group):
            input_ids[row, len(head) : len(head) + len(ids)] = ids
            input_ids[row, lengths[row] - len(tail) : lengths[row]] = tail
        mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
        if rows > len(group):
            input_ids[len(group) :] = input_ids[0]
            mask = np.concatenate([mask, np.repeat(mask[:1], rows - len(group), axis=0)])
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self._type_ids:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return features

    def _to_device(self, features: dict) -> dict:
        """Features on the model's device: on a GPU through pinned memory without waiting,
        so the host goes on to build the next batch while this one is copied and run."""
        if not self.on_cuda:
            return features
        return {name: tensor.pin_memory().to(self.device, non_blocking=True) for name, tensor in features.items()}

    def embed(self, token_ids: Sequence[np.ndarray], on_batch: Callable[[int, int], None] | None = None,
              prefix: str | None = None) -> np.ndarray:
        """Normalised float32 vectors, one row per chunk, in the order given, from the
        chunker's token ids (the text is never tokenized again); ``on_batch(chunks,
        tokens)`` hears of each batch done (progress). ``prefix``: put before each text
        instead of the profile's document prefix (a query's).

        Vectors stay on the device until every batch has been queued, then come back in
        one copy: the host never waits for the GPU between batches."""
        import torch

        frame = self._frame(prefix)
        frame_tokens = len(frame[0]) + len(frame[1])
        counts = [len(ids) for ids in token_ids]
        vectors = torch.empty((len(token_ids), self.dimension), dtype=torch.float32, device=self.device)
        pending = list(range(len(token_ids)))
        while pending:
            batches = self.batches([counts[i] for i in pending], frame_tokens)
            batches = [Batch([pending[i] for i in b.indices], b.rows, b.width) for b in batches]
            pending = []
            for number, batch in enumerate(batches):
                try:
                    features = self._to_device(self._features([token_ids[i] for i in batch.indices], frame, batch.shape))
                    with torch.inference_mode(), self._autocast():
                        embedded = self.model(features)["sentence_embedding"][: len(batch.indices)].float()
                        if self.truncate_to:
                            embedded = matryoshka(embedded, self.truncate_to)
                        where = self._to_device({"rows": torch.tensor(batch.indices)})["rows"]
                        vectors.index_copy_(0, where, torch.nn.functional.normalize(embedded, dim=1))
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    features = embedded = None
                    self._lower_budget(batch.rows, batch.width, error)
                    pending = [i for rest in batches[number:] for i in rest.indices]  # batched again, smaller
                    break
                real = self._count_batch(batch, counts, frame_tokens)
                if on_batch:
                    on_batch(len(batch.indices), real)
        return vectors.cpu().numpy()

    def _count_batch(self, batch: Batch, counts: Sequence[int], frame_tokens: int) -> int:
        """Record a batch's shape and padding (`make bench` prints them); returns its real tokens."""
        real = sum(counts[i] for i in batch.indices)
        self.shapes_met[batch.shape] += 1
        self.padded_tokens += batch.rows * batch.width
        self.framed_tokens += real + frame_tokens * len(batch.indices)
        return real

    def _lower_budget(self, rows: int, width: int, error: Exception) -> None:
        """After running out of memory on a batch of ``rows`` × ``width`` tokens, halve the
        batch token budget (for this worker's later batches too) instead of failing the
        shard; a single row that does not fit is an error no smaller batch can mend."""
        padded = rows * width
        if rows == 1:
            raise PipelineError(f"out of memory on {self.device} embedding one chunk of {padded} tokens: {error}") from error
        self.batch_tokens = max(padded // 2, width)
        if self.on_cuda:
            import torch

            torch.cuda.empty_cache()
        log.warning("out of memory on %s with a batch of %d rows (%d padded tokens): batch token budget now %d, "
                    "batch split and run again", self.device, rows, padded, self.batch_tokens)

    def embed_texts(self, texts: Sequence[str], prefix: str | None = None) -> np.ndarray:
        """Vectors of texts that do not come from the chunker, the way chunks get theirs.

        ``prefix``: what goes before each text instead of the profile's document prefix,
        e.g. ``profile.query_prefix`` for a search query (models like nomic are trained
        with one prefix for documents and another for queries). Texts are cut to what
        fits the model with that prefix."""
        if prefix is None:
            return self.embed(self.token_ids(texts))
        head, tail = self._frame(prefix)
        return self.embed(self.token_ids(texts, self.max_tokens - len(head) - len(tail)), prefix=prefix)

    def _autocast(self):
        if self.precision != "bfloat16":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)

    def runtime(self) -> dict[str, object]:
        """How the vectors were computed, for a shard's stats (speed, not meaning): which
        kernels and shapes win depends on the GPU and the torch version."""
        import torch

        policy = self.shape_policy
        return {
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(self.device) if self.on_cuda else None,
            "batch_tokens": self.batch_tokens,
            "precision_choice": f"{self.precision}: {self.precision_reason}",
            "batch_widths": f"{len(policy.widths)} from {policy.widths[0]} to {policy.widths[-1]}" if policy.widths else "exact",
        }

    def settings(self) -> dict[str, str]:
        """What a reader needs to refuse mixing vectors from two models (file metadata)."""
        return {
            "model_profile": self.profile.name,
            "model_id": self.profile.model_id,
            "dimension": str(self.dimension),
            **({"matryoshka_from": str(self.profile.dimension)} if self.truncate_to else {}),
            "prefix": self.profile.prefix,
            "max_tokens": str(self.max_tokens),
            "normalized": "true",
            "precision": self.precision,
            "weights_sha256": self.weights_sha256,
            **({"stand_in_for": self.stand_in_for} if self.stand_in_for else {}),
            **self.chunker.as_metadata(),
        }


@lru_cache(maxsize=8)
def weights_fingerprint(model_path: str) -> str:
    """The first 16 hex digits of a sha256 over a model folder's weight files (names and
    contents): shards record it, so an output never mixes two sets of weights that share
    a model id (a new revision, a fine-tune, a stand-in)."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's (a plain RuntimeError)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))


@dataclass(frozen=True)
class EmbedderSettings:
    """What loads a model and shapes its batches; the key of the one model a process
    keeps per settings (``load_embedder``). Zeros and ``auto`` take the defaults."""

    model: str = default("model")  # profile name
    model_path: str = default("model_path")  # a local folder instead of the profile's own way of finding weights
    device: str = default("device")
    max_tokens: int = default("max_tokens")  # 0: the profile's
    batch_tokens: int = default("batch_tokens")  # padded tokens per batch; 0: by device
    precision: str = default("precision")
    dimensions: int = default("dimensions")  # 0: the model's; fewer for a model trained for Matryoshka truncation


@lru_cache(maxsize=2)
def load_embedder(settings: EmbedderSettings) -> Embedder:
    """One model per worker process and settings, however many shards it runs."""
    return Embedder(profile(settings.model), settings.model_path, settings.device, settings.max_tokens,
                    settings.batch_tokens, settings.precision, settings.dimensions)


def fetch_model(profile_name: str) -> str:
    """Image build step: put a profile's weights and tokenizer into the local cache once,
    so pods load them offline and never pay GPU time to download (no modelling code is
    fetched: none is ever run). Needs ``HF_HUB_OFFLINE=0``; a run switches the hub off by
    default."""
    model_profile = profile(profile_name)
    try:
        return model_profile.locate()  # already here: shipped in a package, or cached
    except PipelineError:
        if os.environ.get("HF_HUB_OFFLINE") not in ("0", "false", "False"):
            raise PipelineError(f"{model_profile.model_id} is not cached and the hub is off: run with HF_HUB_OFFLINE=0 to fetch it") from None
    download_model(model_profile.model_id)
    return model_profile.locate()


def check_model(profile_name: str) -> dict:
    """Load a profile offline, exactly as a worker does, and embed one text: the image
    build's proof that a pod will find everything it needs without the network."""
    embedder = Embedder(profile(profile_name), "", "cpu", 0, 4096, "float32")
    [vector] = embedder.embed_texts(["a test sentence"])
    norm = float(np.linalg.norm(vector))
    if vector.shape != (embedder.dimension,) or not np.isfinite(norm) or abs(norm - 1) > 1e-3:
        raise PipelineError(f"model {profile_name} gave a bad test vector (shape {vector.shape}, norm {norm})")
    return {"profile": profile_name, "model_id": embedder.profile.model_id, "dimension": embedder.dimension}
