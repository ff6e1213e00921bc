"""``make cost-estimate``: what a corpus will cost on Runpod, before any pod starts.

tokens  = (tokens per byte, counted on a sample with the model's tokenizer, chunked as
          the pipeline chunks) x (bytes of the whole corpus, from one listing)
hours   = tokens / throughput of the GPU type
dollars = hours x hourly price (read from the Runpod API when RUNPOD_API_KEY is set)

Until measured on a pod (``make bench`` there), a GPU's throughput is derived: its
dense fp16 peak x the share of it an encoder reaches / the model's FLOPs per token at
the sample's mean chunk length (docs/performance.md). ``--tokens-per-second`` gives a
measured figure instead. The report says which it used.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

from pipeline import storage
from pipeline.core.chunking import chunk_budget, chunk_document, plain_tokenizer
from pipeline.core.corpus import Rejected, decode, list_documents, split_front_matter
from pipeline.runpod.throughput import EXPECTED_UTILISATION, FP16_PEAK_FLOPS, derived_tokens_per_second, model_flops_per_token

# Community-cloud prices seen in 2026, used only when the API cannot be asked.
FALLBACK_PRICE_PER_HOUR = {
    "NVIDIA GeForce RTX 4090": 0.34,
    "NVIDIA RTX A6000": 0.33,
    "NVIDIA L40S": 0.79,
}
# Start-up a run pays once: pod provisioning and image pull, model load.
STARTUP_HOURS = 0.25


@dataclass
class CorpusSample:
    documents: int
    bytes: int
    sampled: int
    sampled_bytes: int
    tokens: int  # chunk tokens including per-chunk special and prefix tokens
    chunks: int
    tokenizer: str

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / self.sampled_bytes if self.sampled_bytes else 0.0


def _tokenizer(model: str):
    """The production model's tokenizer when it is on this machine; else the offline
    model's, which has the same BERT uncased WordPiece vocabulary as nomic-embed."""
    from pipeline.core.profiles import profile

    chosen = profile(model)
    try:
        path = chosen.locate()
        name = chosen.model_id
    except Exception:
        path = profile("minilm").locate()
        name = f"{profile('minilm').model_id} (the same vocabulary as {chosen.model_id}, which is not on this machine)"
    from tokenizers import Tokenizer

    return plain_tokenizer(Tokenizer.from_file(os.path.join(path, "tokenizer.json"))), name, chosen


def sample_corpus(corpus: str, pattern: str, model: str, sample_size: int = 200, seed: int = 1848) -> CorpusSample:
    """One listing (sizes of every document), and a reservoir sample read and chunked."""
    rng = random.Random(seed)
    reservoir: list = []
    documents = total_bytes = 0
    for listed in list_documents(corpus, pattern):
        documents += 1
        total_bytes += listed.size
        if len(reservoir) < sample_size:
            reservoir.append(listed)
        elif (slot := rng.randrange(documents)) < sample_size:
            reservoir[slot] = listed
    tokenizer, name, chosen = _tokenizer(model)
    settings, reserved = chunk_budget(tokenizer, chosen.max_tokens or 256, chosen.prefix)
    tokens = chunks = sampled_bytes = 0
    for listed in reservoir:
        data = storage.read_bytes(storage.join(corpus, listed.relative))
        sampled_bytes += len(data)
        try:
            text, _ = decode(data)
        except Rejected:
            continue
        _, body_start, _ = split_front_matter(text)
        pieces = chunk_document(text, body_start, tokenizer, settings)
        chunks += len(pieces)
        tokens += sum(p.token_count + reserved for p in pieces)
    return CorpusSample(documents, total_bytes, len(reservoir), sampled_bytes, tokens, chunks, name)


def hourly_price(gpu_type: str, cloud_type: str = "COMMUNITY") -> tuple[float, str]:
    if os.environ.get("RUNPOD_API_KEY"):
        try:
            from pipeline.runpod.sdk import import_runpod

            runpod = import_runpod()
            runpod.api_key = os.environ["RUNPOD_API_KEY"]
            gpu = runpod.get_gpu(gpu_type)
            price = gpu["securePrice" if cloud_type == "SECURE" else "communityPrice"]
            if price:
                return float(price), "Runpod API, now"
        except Exception as exc:  # an estimate still helps with the fallback price
            return FALLBACK_PRICE_PER_HOUR.get(gpu_type, 0.0), f"fallback table (the API failed: {type(exc).__name__})"
    return FALLBACK_PRICE_PER_HOUR.get(gpu_type, 0.0), "fallback table (no RUNPOD_API_KEY)"


def estimate(corpus: str, pattern: str, model: str, gpu_types: list[str], sample_size: int = 200,
             tokens_per_second: Optional[float] = None) -> str:
    """What embedding a corpus would take and cost on each GPU type, before any pod starts.

    Args:
        corpus: the folder or bucket prefix to embed.
        pattern: which files are documents.
        model: the profile whose tokenizer counts the tokens.
        gpu_types: the GPU types priced, in order of preference.
        sample_size: documents read and chunked to learn tokens per byte.
        tokens_per_second: a measured throughput, instead of the one expected per GPU.

    Returns the report as lines of text.
    """
    sample = sample_corpus(corpus, pattern, model, sample_size)
    total_tokens = sample.tokens_per_byte * sample.bytes
    lines = [
        f"corpus {corpus}: {sample.documents:,} documents, {sample.bytes / 1e6:,.1f} MB",
        f"sample: {sample.sampled:,} documents ({sample.sampled_bytes / 1e6:,.2f} MB), {sample.chunks:,} chunks, "
        f"{sample.tokens:,} tokens, counted with {sample.tokenizer}",
        f"estimated tokens to embed: {sample.tokens_per_byte:.3f} tokens/byte x {sample.bytes:,} bytes = {total_tokens:,.0f}",
        f"plus {STARTUP_HOURS} h of start-up per run (pod provisioning, image pull, model load)",
        "",
        f"{'gpu':<26} {'tokens/s':>10} {'hours':>8} {'$/h':>6} {'dollars':>9}  sources",
    ]
    mean_length = sample.tokens / sample.chunks if sample.chunks else 0.0
    flops = model_flops_per_token(model, mean_length)
    for gpu in gpu_types:
        rate = tokens_per_second or derived_tokens_per_second(gpu, model, mean_length)
        if not rate:
            lines.append(f"{gpu:<26} no throughput known: pass --tokens-per-second")
            continue
        price, price_source = hourly_price(gpu)
        hours = total_tokens / rate / 3600 + STARTUP_HOURS
        rate_source = "measured (given)" if tokens_per_second else (
            f"derived: {FP16_PEAK_FLOPS[gpu] / 1e12:.0f} TFLOP/s x {EXPECTED_UTILISATION:.0%} / {flops / 1e6:.0f} MFLOP per token")
        lines.append(f"{gpu:<26} {rate:>10,.0f} {hours:>8.2f} {price:>6.2f} {hours * price:>9.2f}  {rate_source}; price: {price_source}")
    return "\n".join(lines)
