"""``python -m pipeline report OUTPUT``: one HTML page and one PNG that show how a run went.

The figures come from what a run leaves behind, so the report works on a run still going,
on a bucket output and long after the workers are gone: the shard footers
(``pipeline.stats``: counts, rejects by reason, start, finish, worker), one column of
each shard (``metadata.token_count``, for the chunk-length histogram), the manifest
(shards in all), the pod ledger (dollars) and, when there is one, luigid's task history
(shards last seen running or failing). ``gather`` reads them into a ``RunReport``;
``render_png`` and ``render_html`` draw it with matplotlib. Memory stays flat however
many shards there are: one shard's token counts at a time, a few numbers per shard kept.
See docs/report.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import matplotlib
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib import dates as mdates
from matplotlib import ticker
from matplotlib.figure import Figure

from pipeline import storage
from pipeline.output import layout
from pipeline.output.layout import OutputLayout, require_manifest
from pipeline.core.corpus import manifest_info
from pipeline.core.sync import describe_sync, last_sync
from pipeline.output.evaluate import describe_evaluation, read_evaluation
from pipeline.errors import PipelineError
from pipeline.output.ledger import cost_report
from pipeline.core.progress import format_duration
from pipeline.output.footers import COUNTS, active_seconds, read_footers, total
from pipeline.output.status import shard_events, shard_list, unfinished_shards  # the same lists as `status` shows
LEGEND_ENTRIES = 10  # more workers or pods than this: the first ones are named, the rest counted
STYLE = {"text.parse_math": False, "font.size": 10}  # a "$" in a pod name or title is text, not maths


@dataclass(frozen=True)
class ShardSpan:
    """One published shard: when it was made, by whom, and how much."""

    shard: int
    worker: str
    device: str
    started: dt.datetime
    finished: dt.datetime
    seconds: float
    tokens: int
    chunks: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class PodSpan:
    """One pod of the ledger: billed from ``started`` to ``ended`` (now, if still running)."""

    pod_id: str
    gpu_type: str
    price_per_hour: float
    started: dt.datetime
    ended: dt.datetime
    running: bool
    dollars: float


@dataclass
class RunReport:
    """Every figure of the report, read from one output at one moment (``now``)."""

    output: str
    now: dt.datetime
    finished: bool  # _SUCCESS.json is there
    shards_total: int  # from the manifest
    shards: list[ShardSpan]  # the published ones, by shard index
    totals: dict[str, int]  # COUNTS summed over the shards' stats
    rejected_by_reason: dict[str, int]
    chunk_lengths: dict[int, int]  # {tokens: chunks of that many tokens}
    settings: dict[str, str]  # the first shard's footer settings (model_id, dimension, ...)
    precisions: list[str]
    pods: list[PodSpan]
    dollars: float
    history: Optional[str]  # the task history read, if any
    running: list[int]  # shards last seen running (task history)
    failed: list[int]  # shards whose last run failed (task history)
    sync: Optional[dict] = None  # what the last --sync changed (core.sync.last_sync); None if never synced
    evaluation: Optional[dict] = None  # the last ``evaluate``'s figures (output.evaluate); None if never evaluated

    @property
    def wall_seconds(self) -> float:
        """Seconds in which at least one shard was being made (as in _SUCCESS.json)."""
        return active_seconds([(s.started, s.finished) for s in self.shards])

    @property
    def tokens_per_second(self) -> float:
        wall = self.wall_seconds
        return self.totals["tokens"] / wall if wall > 0 else 0.0

    @property
    def workers(self) -> list[str]:
        """Worker processes in the order of their first shard's start."""
        return list(dict.fromkeys(s.worker for s in sorted(self.shards, key=lambda s: s.started)))


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


def shard_chunk_lengths(path: str) -> Counter:
    """{tokens: chunks} of one shard, reading only its ``metadata.token_count`` column
    (ranged reads of that column's pages for a bucket shard)."""
    with storage.open_for_reading(path) as f:
        column = pq.ParquetFile(f).read(columns=["metadata.token_count"]).column("metadata")
    counted = pc.value_counts(pc.drop_null(pc.struct_field(column, "token_count")))
    return Counter({item["values"]: item["counts"] for item in counted.to_pylist()})


def gather(output: str | os.PathLike, history: Optional[Path | str] = None, now: Optional[float] = None,
           on_shard: Optional[Callable[[int], None]] = None) -> RunReport:
    """The report's figures for a local or bucket output; ``now`` (epoch seconds) is when
    running pods are costed up to; ``on_shard(shards)`` is called after each shard read,
    for a progress bar. Raises PipelineError when there is nothing to report."""
    output = os.fspath(output).rstrip("/") or os.fspath(output)
    history = Path(history) if history else None
    where = OutputLayout.of(output)
    manifest = require_manifest(where)
    footers = read_footers(where)
    if not footers:
        raise PipelineError(f"{output} has no shards yet ({layout.SHARDS}/{layout.SHARD_FILE_PATTERN}): nothing to report")
    now = time.time() if now is None else now
    totals, lengths = total(footers), Counter()
    for footer in footers:
        lengths.update(shard_chunk_lengths(footer.path))
        if on_shard:
            on_shard(len(footers))
    spans = [ShardSpan(shard=f.number, worker=f.stats.get("worker", "unknown"), device=f.stats.get("device", "unknown"),
                       started=f.span[0], finished=f.span[1], seconds=float(f.stats["seconds"]), tokens=f.stats["tokens"],
                       chunks=f.stats["chunks"]) for f in footers]
    events = shard_events(history, output) if history and history.exists() else {}
    running, failed = unfinished_shards(events, done={f.number for f in footers})
    cost = cost_report(output, now)
    pods = [PodSpan(pod_id=p["pod_id"], gpu_type=p.get("gpu_type") or "", price_per_hour=p["price_per_hour"],
                    started=_utc(p["started_at_epoch"]), ended=_utc(p["stopped_at_epoch"] or now),
                    running=p["stopped_at_epoch"] is None, dollars=p["dollars"]) for p in cost["pods"]]
    return RunReport(
        output=output, now=_utc(now), finished=storage.exists(where.summary),
        shards_total=int(manifest_info(manifest)["shards"]), shards=spans,
        totals={key: totals.counts[key] for key in COUNTS}, rejected_by_reason=dict(totals.rejected_by_reason.most_common()),
        chunk_lengths=dict(sorted(lengths.items())), settings=totals.settings, precisions=totals.precisions,
        pods=pods, dollars=cost["dollars"], history=str(history) if events else None, running=running, failed=failed,
        sync=last_sync(output), evaluation=read_evaluation(output),
    )


# ---------------------------------------------------------------------------------------
# Text


def state_line(report: RunReport) -> str:
    done = f"{len(report.shards):,} of {report.shards_total:,} shards"
    return f"Finished: {done}" if report.finished else f"Not finished: {done} done (no {layout.SUMMARY} yet)"


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def totals_rows(report: RunReport) -> list[tuple[str, str]]:
    """(label, value) lines of the totals table, for the page and the PNG alike."""
    t, s = report.totals, report.settings
    running_pods = sum(p.running for p in report.pods)
    shards = f"{len(report.shards):,} of {report.shards_total:,}" + ("" if report.finished else " (not finished)")
    dollars = "$0.00 (no pods: nothing was spent on Runpod)"
    if report.pods:
        dollars = f"${report.dollars:,.2f} on {len(report.pods)} Runpod pod(s)"
        dollars += f", {running_pods} still running" if running_pods else ""
    rows = [
        ("shards done", shards),
        ("documents", f"{t['documents']:,}"),
        ("embedded", f"{t['embedded_documents']:,}"),
        ("rejected", f"{t['rejected_documents']:,}"),
        ("chunks", f"{t['chunks']:,}"),
        ("tokens", f"{t['tokens']:,}"),
        ("tokens/s", f"{report.tokens_per_second:,.0f} while shards were being made "
                     f"({format_duration(report.wall_seconds)})"),
        ("model", f"{s.get('model_id', '?')} ({s.get('model_profile', '?')}, {', '.join(report.precisions)})"),
        ("dimension", s.get("dimension", "?") + (f" (of {s['matryoshka_from']}, Matryoshka)" if s.get("matryoshka_from") else "")),
        ("vectors stored as", ", ".join([s.get("vector_dtype", "float32"), *filter(None, s.get("compact_columns", "").split(","))])),
        ("devices", ", ".join(sorted({span.device for span in report.shards}))),
        ("workers", f"{len(report.workers):,}"),
        ("dollars", dollars),
        ("first start", _when(min(span.started for span in report.shards))),
        ("last finish", _when(max(span.finished for span in report.shards))),
        *([("sync", describe_sync(report.sync))] if report.sync else []),
        *([("retrieval", describe_evaluation(report.evaluation))] if report.evaluation else []),
    ]
    if report.history:
        rows += [("running", shard_list(report.running)), ("failed", shard_list(report.failed))]
    return rows


# ---------------------------------------------------------------------------------------
# Charts: each draws one panel on an Axes, for the PNG's grid and the page's images alike,
# and returns the line to show instead where it has nothing to chart (no pods, no rejects)


def _time_axis(ax) -> None:
    locator = mdates.AutoDateLocator(tz=dt.timezone.utc)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=dt.timezone.utc))
    ax.set_xlabel("time (UTC)")
    ax.grid(alpha=0.3)


def _legend(ax, count: int, what: str) -> None:
    """A legend of at most LEGEND_ENTRIES names; beyond that it says how many are not named."""
    handles, labels = ax.get_legend_handles_labels()
    title = f"first {LEGEND_ENTRIES} of {count} {what}" if count > LEGEND_ENTRIES else None
    ax.legend(handles[:LEGEND_ENTRIES], labels[:LEGEND_ENTRIES], title=title, fontsize="small",
              title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _nothing(ax, message: str) -> str:
    """A panel with nothing to chart says so; the message is returned for the page to show as text."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize="large", color="0.35")
    ax.set_axis_off()
    return message


def draw_throughput(ax, report: RunReport) -> None:
    """Each shard a segment from its start to its finish at its tokens/s, one colour per
    worker: overlapping segments are workers running at once."""
    by_worker: dict[str, list[ShardSpan]] = {w: [] for w in report.workers}
    for span in report.shards:
        by_worker[span.worker].append(span)
    palette = matplotlib.colormaps["tab10" if len(by_worker) <= 10 else "tab20"]
    many = len(report.shards) > 200
    for i, (worker, spans) in enumerate(by_worker.items()):
        rates = [s.tokens_per_second for s in spans]
        colour = palette(i % palette.N)
        ax.hlines(rates, [s.started for s in spans], [s.finished for s in spans], colors=[colour],
                  linewidth=1 if many else 2.5, alpha=0.6 if many else 1, label=f"{worker} ({len(spans):,} shards)")
        ax.plot([s.finished for s in spans], rates, "o", color=colour, markersize=1.5 if many else 4)
    ax.set_title(f"Throughput per shard: {len(report.shards):,} shards by {len(by_worker):,} worker(s)", loc="left")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(0, max(s.tokens_per_second for s in report.shards) * 1.1 or 1)
    ax.yaxis.set_major_formatter(ticker.EngFormatter())
    _time_axis(ax)
    _legend(ax, len(by_worker), "workers")


def draw_cumulative(ax, report: RunReport) -> None:
    """Tokens in published shards over time: its slope is the whole run's throughput."""
    spans = sorted(report.shards, key=lambda s: s.finished)
    times = [min(s.started for s in spans)] + [s.finished for s in spans]
    totals = [0]
    for span in spans:
        totals.append(totals[-1] + span.tokens)
    ax.step(times, totals, where="post", color="tab:blue")
    ax.fill_between(times, totals, step="post", alpha=0.15, color="tab:blue")
    ax.set_title(f"Tokens embedded over time: {report.totals['tokens']:,} in all, "
                 f"{report.tokens_per_second:,.0f} tokens/s", loc="left")
    ax.set_ylabel("tokens (cumulative)")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(ticker.EngFormatter())
    _time_axis(ax)


def draw_cost(ax, report: RunReport) -> Optional[str]:
    """A line per pod: its dollars from creation to its end (to now while it runs)."""
    if not report.pods:
        ax.set_title("Cost per pod", loc="left")
        return _nothing(ax, "no pods: nothing was spent on Runpod")
    for pod in report.pods:
        state = "running" if pod.running else "ended"
        line, = ax.plot([pod.started, pod.ended], [0, pod.dollars], linestyle="--" if pod.running else "-",
                        marker="o", markersize=3,
                        label=f"{pod.pod_id} {pod.gpu_type} ${pod.price_per_hour:.2f}/h: ${pod.dollars:,.2f} ({state})")
    ax.set_title(f"Cost per pod: ${report.dollars:,.2f} in all", loc="left")
    ax.set_ylabel("dollars (cumulative)")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(ticker.StrMethodFormatter("${x:,.2f}"))
    _time_axis(ax)
    _legend(ax, len(report.pods), "pods")
    return None


def draw_rejects(ax, report: RunReport) -> Optional[str]:
    """Rejected documents by reason, most frequent on top."""
    ax.set_title(f"Rejected documents by reason: {report.totals['rejected_documents']:,} "
                 f"of {report.totals['documents']:,}", loc="left")
    if not report.rejected_by_reason:
        return _nothing(ax, "no rejects: every document was embedded")
    reasons = list(report.rejected_by_reason)
    bars = ax.barh(reasons, [report.rejected_by_reason[r] for r in reasons], color="tab:red", height=0.6)
    ax.bar_label(bars, labels=[f"{report.rejected_by_reason[r]:,}" for r in reasons], padding=3)
    ax.set_ylim(max(len(reasons), 6) - 0.5, -0.5)  # top down, and bars no thicker for a few reasons
    ax.set_xlabel("documents")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    return None


def draw_chunk_lengths(ax, report: RunReport) -> None:
    """How many chunks have how many tokens, with the chunker's token budget marked."""
    lengths, counts = list(report.chunk_lengths), list(report.chunk_lengths.values())
    budget = int(report.settings.get("chunk_max_tokens", 0))
    top = max(lengths + [budget]) + 1
    width = -(-top // 60)  # whole tokens per bin, at most 60 bins
    ax.hist(lengths, bins=range(0, top + width, width), weights=counts, color="tab:green")
    if budget:
        ax.axvline(budget, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(f"budget {budget}", (budget, 1), xycoords=("data", "axes fraction"), xytext=(-4, -4),
                    textcoords="offset points", ha="right", va="top", fontsize="small", color="0.3")
    chunks = report.totals["chunks"]
    mean = report.totals["tokens"] / chunks if chunks else 0
    ax.set_title(f"Chunk length: {chunks:,} chunks, mean {mean:,.0f} tokens", loc="left")
    ax.set_xlabel("tokens per chunk")
    ax.set_ylabel("chunks")
    ax.yaxis.set_major_formatter(ticker.EngFormatter())
    ax.grid(axis="y", alpha=0.3)


def draw_totals(ax, report: RunReport) -> None:
    rows = totals_rows(report)
    width = max(len(label) for label, _ in rows)
    ax.set_title("Totals", loc="left")
    ax.text(0, 1, "\n".join(f"{label:<{width}}  {value}" for label, value in rows), va="top", family="monospace",
            transform=ax.transAxes, linespacing=1.5)
    ax.set_axis_off()


CHARTS: list[tuple[str, Callable]] = [
    ("Throughput per shard", draw_throughput),
    ("Tokens over time", draw_cumulative),
    ("Cost per pod", draw_cost),
    ("Rejects by reason", draw_rejects),
    ("Chunk lengths", draw_chunk_lengths),
]


def _png(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# The PNG's rows: (charts, their relative widths). Each row is a subfigure laid out on
# its own, so a legend beside one chart does not squeeze the charts of the other rows.
PNG_ROWS = [((draw_throughput, draw_totals), (2.2, 1)),
            ((draw_cumulative, draw_cost), (1, 1.4)),
            ((draw_chunk_lengths, draw_rejects), (1.6, 1))]


def render_png(report: RunReport) -> bytes:
    """Every chart and the totals in one image."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(20, 15), layout="constrained")
        for row, (draws, widths) in zip(figure.subfigures(len(PNG_ROWS), 1), PNG_ROWS):
            for draw, ax in zip(draws, row.subplots(1, len(draws), width_ratios=widths)):
                draw(ax, report)
        figure.suptitle(f"Run report: {report.output}\n{state_line(report)}; as of {_when(report.now)}",
                        fontsize="x-large", horizontalalignment="left", x=0.01)
        return _png(figure, dpi=100)


def chart_section(title: str, draw: Callable, report: RunReport) -> str:
    """One chart of the page as a PNG data URI, or the line saying why there is none."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(11, 3.8), layout="constrained")
        nothing = draw(figure.subplots(), report)
        if nothing:
            return f'<section><h2>{html.escape(title)}</h2><p class="nothing">{html.escape(nothing)}</p></section>'
        image = base64.b64encode(_png(figure, dpi=130)).decode()
    return (f'<section><h2>{html.escape(title)}</h2>'
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{image}"></section>')


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .output { font-family: monospace; margin-top: 0; }
.state { padding: 0.5em 0.8em; border-radius: 4px; display: inline-block; font-weight: 600; }
.finished { background: #e3f4e1; } .unfinished { background: #fdf0d5; }
table { border-collapse: collapse; } td, th { padding: 0.2em 1em 0.2em 0; text-align: left; vertical-align: top; }
th { font-weight: 600; color: #555; } td.number { text-align: right; }
img { width: 100%; height: auto; border: 1px solid #ddd; }
.nothing { color: #666; font-style: italic; }
footer { margin-top: 2em; color: #777; font-size: small; }
"""


def render_html(report: RunReport) -> str:
    """A page with nothing outside it: the charts are PNG data URIs, the style inline,
    and every text from the output escaped."""
    e = html.escape
    totals = "\n".join(f"<tr><th>{e(label)}</th><td>{e(value)}</td></tr>" for label, value in totals_rows(report))
    charts = "\n".join(chart_section(title, draw, report) for title, draw in CHARTS)
    history = f" and the task history {e(report.history)}" if report.history else ""
    pods = ""
    if report.pods:
        rows = "\n".join(
            f"<tr><td>{e(p.pod_id)}</td><td>{e(p.gpu_type)}</td><td class=number>{p.price_per_hour:.3f}</td>"
            f"<td>{e(_when(p.started))}</td><td>{'running' if p.running else e(_when(p.ended))}</td>"
            f"<td class=number>{p.dollars:,.4f}</td></tr>" for p in report.pods)
        pods = ("<section><h2>Pods</h2><table><tr><th>pod</th><th>GPU</th><th>$/h</th><th>created</th>"
                f"<th>ended</th><th>dollars</th></tr>\n{rows}</table></section>")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Run report: {e(report.output)}</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>Run report</h1>
<p class="output">{e(report.output)}</p>
<p class="state {'finished' if report.finished else 'unfinished'}">{e(state_line(report))}</p>
<section><h2>Totals</h2><table>
{totals}
</table></section>
{charts}
{pods}
<footer>As of {e(_when(report.now))}, from the shard footers, the manifest and the pod ledger{history};
python -m pipeline report (docs/report.md).</footer>
</body>
</html>
"""
