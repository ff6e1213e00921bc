"""The one pass over an output's shard footers that status, the run summary and the
report share: what it reads, what it skips, and that all three count the same."""

import datetime as dt
import json

import pytest

from helpers import finished_output
from pipeline.output.footers import COUNTS, ShardFooter, active_seconds, read_footers, total
from pipeline.output.layout import OutputLayout
from pipeline.output.report import gather
from pipeline.output.status import run_status
from pipeline.output.verify import verify_output


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedder):
    return finished_output(tmp_path_factory.mktemp("footers"), embedder)


def test_the_footers_add_up_to_what_verify_counts_in_the_rows(finished):
    footers = read_footers(OutputLayout.of(finished))
    assert [f.number for f in footers] == [0, 1, 2]
    totals, verdict = total(footers), verify_output(str(finished))
    assert verdict.ok and totals.shards == verdict.totals["shards"] == 3
    assert {key: totals.counts[key] for key in COUNTS} == {key: verdict.totals[key] for key in COUNTS}
    assert totals.counts["rejected_documents"] == 2 and sum(totals.rejected_by_reason.values()) == 2
    assert totals.settings["model_id"] == verdict.settings["model_id"] and totals.workers and totals.devices == ["cpu"]
    assert 0 < totals.busy_seconds <= (totals.finished - totals.started).total_seconds()


def test_status_summary_and_report_count_the_same(finished):
    summary = json.loads((finished / "_SUCCESS.json").read_text())
    status, report = run_status(str(finished)), gather(finished)
    assert summary["documents"] == status["documents_done"] == report.totals["documents"]
    for key in ("chunks", "tokens", "rejected_documents"):
        assert summary[key] == status[key] == report.totals[key]
    assert summary["wall_seconds"] == pytest.approx(report.wall_seconds, abs=1e-3)


def test_the_listing_skips_what_is_no_shard_and_asking_for_a_missing_one_fails(finished, tmp_path):
    layout = OutputLayout.of(finished)
    (finished / "shards" / ".shard-000003.parquet.tmp-1").write_bytes(b"partial")  # a killed upload's temp file
    (finished / "shards" / "notes.parquet").write_bytes(b"stray")
    try:
        assert [f.number for f in read_footers(layout)] == [0, 1, 2]
        with pytest.raises(FileNotFoundError):
            read_footers(layout, numbers=[0, 3])
    finally:
        (finished / "shards" / ".shard-000003.parquet.tmp-1").unlink()
        (finished / "shards" / "notes.parquet").unlink()
    seen = []
    read_footers(layout, numbers=[2, 0], on_footer=seen.append)
    assert seen == [2, 2]


def test_a_footer_without_stats_parses_with_empty_stats_and_nothing_totals_to_zero():
    footer = ShardFooter.parse(4, "x", {b"pipeline.model_id": b"m", b"other.key": b"v"})
    assert footer.settings == {"model_id": "m"} and footer.stats == {}
    empty = total([])
    assert empty.shards == 0 and sum(empty.counts.values()) == 0 and empty.busy_seconds == 0 and empty.started is None


def test_active_seconds_skip_pauses_and_do_not_double_count_parallel_shards():
    t = lambda s: dt.datetime(2026, 1, 1) + dt.timedelta(seconds=s)  # noqa: E731
    assert active_seconds([(t(0), t(10)), (t(5), t(12)), (t(100), t(110))]) == 22
    assert active_seconds([(t(0), t(10))]) == 10
    assert active_seconds([]) == 0

