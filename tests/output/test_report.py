"""pipeline/output/report.py and ``python -m pipeline report``: the figures equal what the
footers, the rejects, the summary and the pod ledger say, locally and from a bucket; a
run in progress is reported as such; the page stands alone and every chart is drawn in a
real browser, whose screenshots go to ``test-artifacts/report-*.png``."""

import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import luigi
import pyarrow.parquet as pq
import pytest

from helpers import finished_output
from pipeline.errors import PipelineError
from pipeline.output.ledger import PodLedger, ledger_record
from pipeline.output.report import PodSpan, RunReport, ShardSpan, gather, render_html, render_png

NOW = time.time()  # gather() costs running pods up to this; the command, up to its own now
HEADINGS = ["Run report", "Totals", "Throughput per shard", "Tokens over time", "Cost per pod", "Rejects by reason",
            "Chunk lengths"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedder):
    """A whole local run: 3 shards, two documents rejected, _SUCCESS.json, no pods."""
    return finished_output(tmp_path_factory.mktemp("report"), embedder)


@pytest.fixture(scope="module")
def with_pods(finished, tmp_path_factory):
    """The same run as made on Runpod: one pod ended, one still running, in its ledger.
    A pod name with markup in it must reach the page as text."""
    output = tmp_path_factory.mktemp("pods") / "out"
    shutil.copytree(finished, output)
    ledger = PodLedger(str(output))
    ended = ledger_record("pod-ended", "embedding-pipeline-r1-1", "r1", "NVIDIA GeForce RTX 4090", 1, "SECURE",
                          0.69, "image", NOW - 7200)
    PodLedger.mark_ended(ended, "done", NOW - 3600)
    running = ledger_record("<b>pod-running</b>", "embedding-pipeline-r1-2", "r1", "NVIDIA L40S", 1, "SECURE",
                            1.00, "image", NOW - 1800)
    for record in (ended, running):
        ledger.record(record)
    return output


def success(output) -> dict:
    return json.loads((output / "_SUCCESS.json").read_text())


def test_the_figures_are_what_the_footers_rejects_and_ledger_say(with_pods):
    report = gather(str(with_pods), now=NOW)
    summary = success(with_pods)
    assert report.finished and report.shards_total == len(report.shards) == summary["shards"] == 3
    for key in ("documents", "embedded_documents", "rejected_documents", "chunks", "tokens"):
        assert report.totals[key] == summary[key], key
    assert report.tokens_per_second == pytest.approx(summary["tokens_per_second"], rel=1e-3)
    assert report.settings["model_id"] == summary["model"] and report.settings["dimension"] == "384"

    tokens = pq.read_table(with_pods / "shards")["metadata"].combine_chunks().field("token_count").to_pylist()
    assert report.chunk_lengths == dict(sorted(Counter(tokens).items()))
    assert sum(report.chunk_lengths.values()) == summary["chunks"]

    reasons = Counter(json.loads(line)["reason"] for path in (with_pods / "rejects").glob("*.jsonl")
                      for line in path.read_text().splitlines())
    assert report.rejected_by_reason == dict(reasons) == {"binary": 1, "empty": 1}

    for span in report.shards:
        footer = pq.read_metadata(with_pods / "shards" / f"shard-{span.shard:06d}.parquet").metadata
        stats = json.loads(footer[b"pipeline.stats"])
        assert (span.tokens, span.chunks, span.worker, span.started.isoformat()) == \
               (stats["tokens"], stats["chunks"], stats["worker"], stats["started_at"])

    records = {r["pod_id"]: r for r in PodLedger(str(with_pods)).records()}
    assert {p.pod_id: p.dollars for p in report.pods} == pytest.approx(
        {pod_id: PodLedger.dollars(r, NOW) for pod_id, r in records.items()})
    assert {p.pod_id: p.running for p in report.pods} == {"pod-ended": False, "<b>pod-running</b>": True}
    assert report.dollars == pytest.approx(0.69 + 1.00 / 2)


def test_the_command_writes_a_page_that_stands_alone_and_a_png(with_pods, tmp_path):
    page, image = tmp_path / "page.html", tmp_path / "image.png"
    done = subprocess.run([sys.executable, "-m", "pipeline", "report", str(with_pods), "--html", str(page),
                           "--png", str(image)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(page), str(image)]

    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(image) as png:
        assert png.width >= 1600 and png.height >= 1200

    text = page.read_text()
    for external in ('src="http', "src='http", 'href="http', "<script", "<link", "url(http", "@import"):
        assert external not in text, external
    assert text.count('src="data:image/png;base64,') == 5
    summary = success(with_pods)
    for figure in ("3 of 3", f"{summary['documents']:,}", f"{summary['chunks']:,}", f"{summary['tokens']:,}",
                   summary["model"], "384", "cpu", "Finished", "&lt;b&gt;pod-running&lt;/b&gt;",
                   "on 2 Runpod pod(s), 1 still running", "<td class=number>0.6900</td>"):  # the ended pod's dollars
        assert figure in text, figure
    assert "<b>pod-running</b>" not in text


def test_the_default_files_are_named_after_the_output_in_the_current_folder(finished, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "report", str(finished) + "/"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["out-report.html", "out-report.png"]
    assert (tmp_path / "out-report.html").stat().st_size and (tmp_path / "out-report.png").stat().st_size


def test_an_output_without_shards_is_one_error_line(finished, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    shutil.copy(finished / "manifest.parquet", output)
    done = subprocess.run([sys.executable, "-m", "pipeline", "report", str(output)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {output} has no shards yet (shards/shard-NNNNNN.parquet): nothing to report"]
    assert not list(tmp_path.glob("*-report.*"))


@pytest.fixture
def task_history(tmp_path):
    """Luigi's own task history writer on a sqlite file, as luigid would use it."""
    config = luigi.configuration.get_config()
    saved = config.get("task_history", "db_connection", None)
    path = tmp_path / "history.db"
    config.set("task_history", "db_connection", f"sqlite:///{path}")
    from luigi.db_task_history import DbTaskHistory

    yield path, DbTaskHistory()
    if saved is None:
        config.remove_option("task_history", "db_connection")
    else:
        config.set("task_history", "db_connection", saved)


def test_a_run_in_progress_says_so_and_names_its_running_shard(finished, tmp_path, task_history):
    from luigi.scheduler import Task

    output = tmp_path / "out"
    shutil.copytree(finished, output)
    (output / "_SUCCESS.json").unlink()
    (output / "shards" / "shard-000001.parquet").unlink()
    path, history = task_history
    shard = Task("EmbedShard_1", "RUNNING", [], family="EmbedShard", params={"shard": "1", "output": str(output)})
    history.task_scheduled(shard)
    history.task_started(shard, "worker-host")

    report = gather(output, str(path), now=NOW)  # Path and str both taken
    assert not report.finished and (len(report.shards), report.shards_total) == (2, 3)
    assert report.running == [1] and report.failed == [] and report.history == str(path)
    assert sum(report.chunk_lengths.values()) == report.totals["chunks"] < success(finished)["chunks"]
    page = render_html(report)
    assert "Not finished: 2 of 3 shards done" in page and "2 of 3 (not finished)" in page
    assert "1 (1)" in page  # running: one shard, shard 1
    assert "no pods: nothing was spent on Runpod" in page
    assert render_png(report)[:4] == b"\x89PNG"


def test_a_bucket_output_gives_the_same_figures(with_pods, gcs_bucket):
    gcs_bucket.upload_folder(with_pods, "runs/out")
    remote = gather(f"{gcs_bucket.url}/runs/out/", now=NOW)
    assert remote.output == f"{gcs_bucket.url}/runs/out"
    assert replace(remote, output=str(with_pods)) == gather(str(with_pods), now=NOW)


def test_no_manifest_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="no manifest.parquet"):
        gather(str(tmp_path))


def big_run(shards: int = 10_000, workers: int = 24, pods: int = 12) -> RunReport:
    """The figures of a large run on many pods, made up: what the charts must stay readable for."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    spans = []
    for i in range(shards):
        seconds = 200 + (i * 37) % 160  # each worker makes a shard every 280 s or so
        began = start + dt.timedelta(seconds=(i // workers) * 280 + (i % workers) * 7)
        spans.append(ShardSpan(i, f"pod-{i % workers:02d}abcdef pid {100 + i % workers}", "cuda", began,
                               began + dt.timedelta(seconds=seconds), seconds, 600_000 + (i * 7919) % 200_000, 2000))
    end = max(s.finished for s in spans)
    pod_spans = []
    for p in range(pods):  # started a few minutes apart, the last ones ended early, the first still running
        began, ended, price = start + dt.timedelta(minutes=5 * p), end - dt.timedelta(hours=p), 0.69 + 0.1 * (p % 3)
        pod_spans.append(PodSpan(f"pod-{p:02d}abcdef", "NVIDIA GeForce RTX 4090", price, began, ended, p == 0,
                                 (ended - began).total_seconds() / 3600 * price))
    return RunReport(
        output="gs://bucket/big", now=end, finished=True, shards_total=shards, shards=spans,
        totals={"documents": shards * 1000, "embedded_documents": shards * 990, "rejected_documents": shards * 10,
                "chunks": shards * 2000, "tokens": sum(s.tokens for s in spans)},
        rejected_by_reason={"empty": shards * 6, "binary": shards * 3, "changed": shards, "no_text": 1},
        chunk_lengths={n: 1000 + n * 10 for n in range(1, 511)},
        settings={"model_id": "nomic-ai/nomic-embed-text-v1.5", "model_profile": "nomic", "dimension": "768",
                  "chunk_max_tokens": "500"},
        precisions=["float16"], pods=pod_spans, dollars=sum(p.dollars for p in pod_spans), history=None, running=[],
        failed=[])


def test_ten_thousand_shards_render_quickly_and_the_page_stays_small(artifacts_folder):
    report = big_run()
    started = time.monotonic()
    page, image = render_html(report), render_png(report)
    assert time.monotonic() - started < 60
    assert len(page) < 3_000_000  # images, not a shape per shard
    (artifacts_folder / "report-10000-shards.png").write_bytes(image)


def chart_sizes(driver) -> list[tuple[str, int, int]]:
    """(alt, naturalWidth, width on the page) of every image once all are loaded."""
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete ? i.naturalWidth : 0, "
        "i.getBoundingClientRect().width]);")


def test_the_page_in_a_browser_draws_every_chart(with_pods, finished, tmp_path, browser, artifacts_folder):
    from selenium.webdriver.common.by import By

    in_progress = tmp_path / "in-progress"
    shutil.copytree(finished, in_progress)
    (in_progress / "_SUCCESS.json").unlink()
    (in_progress / "shards" / "shard-000002.parquet").unlink()
    # (output, the state line's start, the charts drawn, the lines shown instead of a chart)
    pages = {"finished": (with_pods, "Finished: 3 of 3 shards", 5, []),
             "in-progress": (in_progress, "Not finished: 2 of 3 shards done", 4,
                             ["no pods: nothing was spent on Runpod"])}
    for name, (output, state, charts, nothing) in pages.items():
        page = tmp_path / f"{name}.html"
        page.write_text(render_html(gather(str(output), now=NOW)))
        browser.set_window_size(1400, 1000)
        browser.get(page.as_uri())
        headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h1, h2")]
        assert [h for h in HEADINGS if h not in headings] == []
        sizes = chart_sizes(browser)
        assert len(sizes) == charts and all(natural > 1000 and shown > 500 for _, natural, shown in sizes), sizes
        assert browser.find_element(By.CSS_SELECTOR, ".state").text.startswith(state)
        assert [p.text for p in browser.find_elements(By.CSS_SELECTOR, ".nothing")] == nothing
        # The whole page, however long: a window whose viewport is as tall as the document.
        height, chrome = browser.execute_script("return [document.documentElement.scrollHeight, "
                                                "window.outerHeight - window.innerHeight]")
        browser.set_window_size(1400, height + chrome)
        browser.save_screenshot(str(artifacts_folder / f"report-{name}.png"))
    render = artifacts_folder / "report-finished-image.png"
    render.write_bytes(render_png(gather(str(with_pods), now=NOW)))
