"""make cost-estimate: counts tokens as the pipeline chunks them, prices from the API."""


from fake_runpod import GPU_TYPES, FakeRunpod
from pipeline.core.chunking import chunk_document
from pipeline.core.corpus import decode, split_front_matter
from pipeline.runpod.estimate import estimate, hourly_price, sample_corpus


def test_a_sample_covering_the_corpus_counts_exactly_the_chunk_tokens(small_corpus, embedder):
    sample = sample_corpus(str(small_corpus), "*.md", "minilm", sample_size=100)
    assert (sample.documents, sample.sampled) == (12, 12)
    expected_chunks = expected_tokens = 0
    for path in small_corpus.rglob("*.md"):
        text, _ = decode(path.read_bytes())
        chunks = chunk_document(text, split_front_matter(text)[1], embedder.tokenizer, embedder.chunker)
        expected_chunks += len(chunks)
        expected_tokens += sum(c.token_count + embedder.reserved_tokens for c in chunks)
    assert (sample.chunks, sample.tokens) == (expected_chunks, expected_tokens)
    assert sample.bytes == sum(p.stat().st_size for p in small_corpus.rglob("*.md"))


def test_prices_come_from_the_runpod_api_when_a_key_is_set(monkeypatch, tmp_path, small_corpus):
    api = FakeRunpod()
    try:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", api.url)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("RUNPOD_API_KEY", api.api_key)
        assert hourly_price("NVIDIA L40S") == (GPU_TYPES["NVIDIA L40S"]["communityPrice"], "Runpod API, now")
        report = estimate(str(small_corpus), "*.md", "minilm", ["NVIDIA GeForce RTX 4090"], tokens_per_second=1000)
        assert "measured (given); price: Runpod API, now" in report
        monkeypatch.delenv("RUNPOD_API_KEY")
        assert hourly_price("NVIDIA GeForce RTX 4090")[1] == "fallback table (no RUNPOD_API_KEY)"
    finally:
        api.stop()


def test_the_report_shows_its_arithmetic(small_corpus):
    sample = sample_corpus(str(small_corpus), "*.md", "minilm")
    report = estimate(str(small_corpus), "*.md", "minilm", ["NVIDIA GeForce RTX 4090"], tokens_per_second=100)
    row = next(line for line in report.splitlines() if line.startswith("NVIDIA GeForce RTX 4090"))
    hours = sample.tokens / 100 / 3600 + 0.25
    assert f"{hours:.2f}" in row and f"{hours * 0.34:.2f}" in row


def test_without_a_measured_figure_the_throughput_is_derived_from_the_gpus_peak(small_corpus):
    from pipeline.runpod.throughput import flops_per_token
    from pipeline.runpod.throughput import EXPECTED_UTILISATION, FP16_PEAK_FLOPS, MODEL_SHAPES

    sample = sample_corpus(str(small_corpus), "*.md", "nomic")
    report = estimate(str(small_corpus), "*.md", "nomic", ["NVIDIA GeForce RTX 4090"])
    row = next(line for line in report.splitlines() if line.startswith("NVIDIA GeForce RTX 4090"))
    flops = flops_per_token(MODEL_SHAPES["nomic"], sample.tokens / sample.chunks)
    rate = FP16_PEAK_FLOPS["NVIDIA GeForce RTX 4090"] * EXPECTED_UTILISATION / flops
    assert f"{rate:,.0f}" in row and f"derived: 165 TFLOP/s x 35% / {flops / 1e6:.0f} MFLOP per token" in row
