"""``python -m pipeline …``: helpers around the Luigi tasks.

    python -m pipeline status OUTPUT [--json]  shards done, failed, running; throughput, ETA, dollars
    python -m pipeline verify OUTPUT [--json]  prove the output is whole (exit 1 naming each problem)
    python -m pipeline compact OUTPUT NEW_OUTPUT  a synced output's current rows only, verified before and after
    python -m pipeline compact OUTPUT NEW_OUTPUT --vector-dtype float16 --compact-columns binary  … stored smaller
    python -m pipeline evaluate OUTPUT [--json]  how well the vectors retrieve (recall@1, recall@10, MRR@10)
    python -m pipeline search OUTPUT "query" [-k 5] [--json] [--binary-candidates N]  the chunks nearest a query
    python -m pipeline cost OUTPUT [--json]    dollars per pod, per run and in total
    python -m pipeline pods sweep OUTPUT       end every billed pod of an output; close records of pods gone
    python -m pipeline report OUTPUT [--html F] [--png F]  a page and a PNG: throughput, cost, rejects, chunk lengths
    python -m pipeline image [--no-push]       build and push the pod's image
    python -m pipeline estimate [--corpus C]   what a corpus will cost on Runpod
    python -m pipeline model PROFILE [--fetch] load a model offline (fetch it first)
    python -m pipeline model nomic --save-stand-in DIR  nomic's published layout, random weights: for --model-path throughput runs
    python -m pipeline settings [--write-docs]  every setting's value here, and where it comes from
    python -m pipeline bench [--corpus C] [--model M] [--json F] [--rounds N]  throughput, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


from pipeline import config, storage
from pipeline.config import gpu_type_list, prepare_run
from pipeline.errors import PipelineError
from pipeline.settings import declared
from pipeline.output.layout import OutputLayout


def cost(output: str, as_json: bool) -> None:
    from pipeline.runpod.orphans import gone_pods
    from pipeline.output.ledger import cost_report

    report = cost_report(output)
    gone = gone_pods(output)
    report["gone"] = gone
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not report["pods"]:
        print(f"{output}: no pods in the ledger ({OutputLayout.of(output).pods}/): nothing was spent on Runpod")
        return
    print(f"{'pod':<16} {'run':<10} {'gpu':<26} {'$/h':>7} {'hours':>8} {'dollars':>9}  state")
    for pod in report["pods"]:
        state = f"ended: {pod['end_reason']}" if pod["stopped_at_epoch"] else "RUNNING"
        if gone and pod["pod_id"] in gone:
            state = "RUNNING in the ledger, but the API no longer shows it"
        price, dollars = ("?", "?") if pod.get("price_unknown") else (f"{pod['price_per_hour']:.3f}", f"{pod['dollars']:.4f}")
        print(f"{pod['pod_id']:<16} {pod['run_id']:<10} {pod['gpu_type']:<26} {price:>7} {pod['hours']:>8.3f} {dollars:>9}  {state}")
    for run in report["runs"]:
        print(f"run {run['run_id']}: {run['pods']} pod(s), ${run['dollars']:.4f}" + (f", {run['running']} still running" if run["running"] else ""))
    print(f"total: ${report['dollars']:.4f}" + (f"; {report['running']} pod(s) still running" if report["running"] else ""))
    if report["price_unknown"]:
        print(f"{len(report['price_unknown'])} pod(s) ({', '.join(report['price_unknown'])}) were billed at a price the API "
              "never told (none listed, none shown by the pod): not in the total; the Runpod console has their cost")
    note = gone_note(output, gone, report["running"])
    if note:
        print(note)


def gone_note(output: str, gone: list[str] | None, running: int) -> str:
    """What the API says of the pods the ledger calls running ("" when none are)."""
    if not running:
        return ""
    if gone is None:
        why = "it could not be reached" if os.environ.get("RUNPOD_API_KEY") else "RUNPOD_API_KEY is not set"
        return f"(not checked with the Runpod API: {why})"
    if not gone:
        return "(the Runpod API shows them all: they are billed)"
    return (f"{len(gone)} of them ({', '.join(gone)}) the Runpod API no longer shows: "
            f"`python -m pipeline pods sweep {output}` closes their records")


def pods(action: str, output: str) -> int:
    """``pods sweep``: end every billed pod of the output, whoever follows it."""
    from pipeline.runpod.orphans import sweep_output
    from pipeline.runpod.orchestrator import PodLedger, PodSettings, RunpodOrchestrator

    orchestrator = RunpodOrchestrator(PodSettings(image=""), PodLedger(output))
    ended, closed = sweep_output(orchestrator, output)
    for pod_id in ended:
        print(f"terminated pod {pod_id}")
    for pod_id in closed:
        print(f"closed the record of pod {pod_id}: the API no longer shows it")
    print(f"{output}: {len(ended)} pod(s) terminated, {len(closed)} record(s) closed; no pod of this output is billed now")
    return 0


@contextmanager
def shard_progress(description: str) -> Iterator[Callable[[int], None]]:
    """A bar of shards read (shown on a terminal only), and the ``on_shard(total)``
    callback that moves it."""
    from tqdm import tqdm

    with tqdm(unit="shard", desc=description, disable=None) as bar:
        def tick(total: int) -> None:
            bar.total = total
            bar.update()

        yield tick


def verify(output: str, as_json: bool) -> int:
    """0 when the output is whole, 1 when it is not (one line per problem)."""
    from pipeline.output.verify import format_verdict, verify_output

    with shard_progress("verifying") as tick:
        verdict = verify_output(output, on_shard=tick)
    print(json.dumps(verdict.as_dict(), indent=2) if as_json else format_verdict(output, verdict))
    return 0 if verdict.ok else 1


def compact(output: str, destination: str, vector_dtype: str | None = None, compact_columns: str | None = None) -> int:
    """0 when the compacted output verifies; it is verified before and after."""
    from pipeline.output.compact import compact_output, target_format
    from pipeline.output.verify import format_verdict

    output = storage.canonical(output)
    vector_format = target_format(output, vector_dtype, compact_columns)
    with shard_progress("compacting") as tick:
        verdict = compact_output(output, destination, on_shard=tick, vector_format=vector_format)
    print(format_verdict(destination, verdict))
    return 0 if verdict.ok else 1


def evaluate(output: str, documents: int, sample: int, as_json: bool) -> int:
    """Retrieval figures of an output's vectors, also written beside its shards for the
    run report."""
    from pipeline.output.evaluate import evaluate as run_evaluation
    from pipeline.output.evaluate import format_evaluation, publish_evaluation

    output = storage.canonical(output)
    result = run_evaluation(output, documents=documents, sample=sample)
    publish_evaluation(output, result)
    print(json.dumps(result, indent=2) if as_json else "\n".join(format_evaluation(result)))
    return 0


def search(output: str, query: str, k: int, as_json: bool, binary_candidates: int = 0) -> int:
    """The k chunks nearest the query, best first; 0 even when the output holds none."""
    from pipeline.output.search import format_results
    from pipeline.output.search import search as run_search

    results = run_search(storage.canonical(output), query, k, binary_candidates=binary_candidates)
    print(json.dumps(results, indent=2, ensure_ascii=False) if as_json else format_results(results))
    return 0


def report(output: str, html_file: str | None, png_file: str | None, history: str | None) -> int:
    """Write the run report's page and image (by default ``./<output name>-report.html``
    and ``.png``: a bucket output is never written to) and print their paths."""
    from pathlib import Path, PurePosixPath

    from pipeline import storage
    from pipeline.output.report import gather, render_html, render_png
    from pipeline.config import configured_history

    output = storage.canonical(output)
    with shard_progress("reading") as tick:
        figures = gather(output, Path(history) if history else configured_history(), on_shard=tick)
    name = PurePosixPath(output).name if storage.is_remote(output) else storage.local_path(output).resolve().name
    name = name or "output"  # gs://bucket has a name; / has none
    page, image = Path(html_file or f"{name}-report.html"), Path(png_file or f"{name}-report.png")
    page.write_text(render_html(figures), encoding="utf-8")
    image.write_bytes(render_png(figures))
    print(page)
    print(image)
    return 0


def show_settings(write_docs: bool) -> None:
    """Each setting's value here and its source; secrets only say whether they are set."""
    from pathlib import Path

    from pipeline.settings import SETTINGS, write_docs as write

    if write_docs:
        root = Path(__file__).resolve().parent.parent
        print("\n".join(write(root)) or "README.md and .env.example already say what pipeline/settings.py declares")
        return
    for setting in (s for s in SETTINGS if s.env):
        value, source = config.setting_and_source(setting.name)
        shown = ("(set)" if value else "(not set)") if setting.secret else repr(value)
        print(f"{setting.env:<45} {shown:<30} {source}" + ("  defines the output" if setting.defines_output else ""))


def setting_argument(parser: argparse.ArgumentParser, name: str, flag: str = "") -> None:
    """An option whose type, help and default (the configured value) are its setting's."""
    setting = declared(name)
    flag = flag or "--" + name.replace("_", "-")
    parser.add_argument(flag, dest=flag[2:].replace("-", "_"), type=setting.parse,
                        default=setting.parse(config.setting(name)), help=f"{setting.help} (default: the {name} setting)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Helpers around the embedding pipeline's tasks.")
    commands = parser.add_subparsers(dest="command", required=True)
    status_parser = commands.add_parser("status", help="where a run stands: shards, throughput, ETA, dollars")
    status_parser.add_argument("output", help="the output folder or bucket prefix")
    status_parser.add_argument("--history", default=None,
                               help="luigid's task history (sqlite file); default: luigi.cfg [task_history] db_connection")
    status_parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    verify_parser = commands.add_parser("verify", help="prove an output is whole: every document embedded or rejected, every vector sound")
    verify_parser.add_argument("output", help="the output folder or bucket prefix")
    verify_parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    compact_parser = commands.add_parser("compact", help="a new output of a synced one's current rows only")
    compact_parser.add_argument("output", help="the output folder or bucket prefix (verified first, left as it is)")
    compact_parser.add_argument("new_output", help="where to write the compacted output (verified after)")
    compact_parser.add_argument("--vector-dtype", choices=("float32", "float16"), help="store the vectors so (default: as they are)")
    compact_parser.add_argument("--compact-columns", metavar="COLUMNS",
                                help="binary, int8, binary,int8, or '' for none (default: as they are)")
    evaluate_parser = commands.add_parser("evaluate", help="how well the vectors retrieve: recall@1, recall@10, MRR@10")
    evaluate_parser.add_argument("output", help="the output folder or bucket prefix")
    evaluate_parser.add_argument("--documents", type=int, default=300, help="about how many documents give a query (300)")
    evaluate_parser.add_argument("--sample", type=int, default=10,
                                 help="documents embedded again in float32 where the vectors are stored smaller (10)")
    evaluate_parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    search_parser = commands.add_parser("search", help="the chunks nearest a query, by the output's own model")
    search_parser.add_argument("output", help="the output folder or bucket prefix")
    search_parser.add_argument("query", help="the text to look for")
    search_parser.add_argument("-k", type=int, default=5, help="how many chunks to show (default 5)")
    search_parser.add_argument("--json", action="store_true", help="print the hits as JSON")
    search_parser.add_argument("--binary-candidates", type=int, default=0, metavar="N",
                               help="take N candidates on the binary column (--compact-columns binary), rescore them exactly")
    cost_parser = commands.add_parser("cost", help="dollars spent on Runpod pods for an output")
    cost_parser.add_argument("output", help="the output folder or bucket prefix")
    cost_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    pods_parser = commands.add_parser("pods", help="the Runpod pods of an output")
    pods_parser.add_argument("action", choices=["sweep"], help="sweep: terminate every billed pod of the output and close its record")
    pods_parser.add_argument("output", help="the output folder or bucket prefix")
    report_parser = commands.add_parser("report", help="a page and a PNG of a run: throughput, cost, rejects, lengths")
    report_parser.add_argument("output", help="the output folder or bucket prefix")
    report_parser.add_argument("--html", default=None, help="the page to write; default: ./<output name>-report.html")
    report_parser.add_argument("--png", default=None, help="the image to write; default: ./<output name>-report.png")
    report_parser.add_argument("--history", default=None,
                               help="luigid's task history (sqlite file); default: luigi.cfg [task_history] db_connection")
    image_parser = commands.add_parser("image", help="build the pod's image and push it to PIPELINE_REGISTRY")
    setting_argument(image_parser, "base_image")
    image_parser.add_argument("--stand-in-layers", type=int, default=0,
                              help="bake a stand-in of this many layers (random weights, throughput only) instead of the weights")
    setting_argument(image_parser, "pod_model", "--model")
    image_parser.add_argument("--no-push", action="store_true", help="build only")
    model_parser = commands.add_parser("model", help="load a model profile offline and embed one text")
    model_parser.add_argument("profile", help="model profile (nomic, minilm)")
    model_parser.add_argument("--fetch", action="store_true", help="fetch it into the local cache first (HF_HUB_OFFLINE=0)")
    model_parser.add_argument("--save-stand-in", default="", metavar="DIR",
                              help="write the profile's published layout with random weights to DIR (throughput only: "
                                   "what it makes is marked and refused by verify and search)")
    model_parser.add_argument("--layers", type=int, default=0, help="with --save-stand-in: fewer layers than the model's")
    model_parser.add_argument("--hf-home", action="store_true",
                              help="with --save-stand-in: DIR is a Hugging Face home (HF_HOME); write into its hub cache "
                                   "as a download would, so the profile finds it with no --model-path")
    estimate_parser = commands.add_parser("estimate", help="estimate a corpus's cost on Runpod before any pod starts")
    estimate_parser.add_argument("--corpus", default="", help="folder or bucket prefix; empty: the sample corpus")
    setting_argument(estimate_parser, "pattern")
    setting_argument(estimate_parser, "pod_model", "--model")
    estimate_parser.add_argument("--sample", type=int, default=200, help="documents read and chunked")
    setting_argument(estimate_parser, "gpu_types")
    estimate_parser.add_argument("--tokens-per-second", type=float, default=None, help="a measured throughput to use")
    bench_parser = commands.add_parser("bench", help="measure throughput: baseline, embedder, feed, end to end")
    bench_parser.add_argument("--corpus", default="", help="folder or bucket prefix; empty: the sample corpus")
    setting_argument(bench_parser, "model")  # where a profile's weights are not here: a stand-in in its published layout
    for name in ("model_path", "device", "batch_tokens", "precision"):
        setting_argument(bench_parser, name)
    bench_parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    bench_parser.add_argument("--rounds", type=int, default=3,
                              help="alternating rounds of baseline and embedder, and runs of the feed (medians are reported)")
    settings_parser = commands.add_parser("settings", help="every setting: its value here and where it comes from")
    settings_parser.add_argument("--write-docs", action="store_true",
                                 help="write .env.example and the README's tables from pipeline/settings.py")
    args = parser.parse_args(argv)
    if args.command == "settings":  # before prepare_run puts .env into the environment: say which said what
        show_settings(args.write_docs)
        return 0
    prepare_run(exit_codes=False)
    if getattr(args, "output", None):  # one spelling per output: how the ledger and the pods know it
        args.output = storage.canonical(args.output)
    try:
        if args.command == "status":
            from pathlib import Path

            from pipeline.config import configured_history
            from pipeline.output.status import format_status, run_status
            from pipeline.runpod.orphans import gone_pods

            figures = run_status(storage.canonical(args.output), Path(args.history) if args.history else configured_history(),
                                 gone_pods)
            print(json.dumps(figures, indent=2) if args.json else format_status(figures))
        elif args.command == "verify":
            return verify(args.output, args.json)
        elif args.command == "compact":
            return compact(args.output, args.new_output, args.vector_dtype, args.compact_columns)
        elif args.command == "evaluate":
            return evaluate(args.output, args.documents, args.sample, args.json)
        elif args.command == "search":
            if args.k < 1:
                parser.error("-k must be at least 1")
            return search(args.output, args.query, args.k, args.json, args.binary_candidates)
        elif args.command == "report":
            return report(args.output, args.html, args.png, args.history)
        elif args.command == "cost":
            cost(args.output, args.json)
        elif args.command == "pods":
            return pods(args.action, storage.canonical(args.output))
        elif args.command == "estimate":
            from pipeline.runpod.estimate import estimate
            from pipeline.core.sample import ensure_sample_corpus

            corpus = args.corpus or ensure_sample_corpus()
            gpus = gpu_type_list(args.gpu_types)
            print(estimate(corpus, args.pattern, args.model, gpus, args.sample, args.tokens_per_second))
        elif args.command == "image":
            import logging

            from pipeline.runpod.image import build_and_push

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            print(build_and_push(config.setting("registry"), args.base_image, push=not args.no_push, model=args.model,
                                 stand_in_layers=args.stand_in_layers))
        elif args.command == "bench":
            from pipeline.bench import bench
            from pipeline.core.sample import ensure_sample_corpus

            print(bench(args.corpus or ensure_sample_corpus(), args.model, args.device, args.batch_tokens, args.precision, args.json,
                        args.rounds, args.model_path))
        elif args.command == "model":
            from pipeline.core.embedder import check_model, fetch_model

            if args.save_stand_in:
                from pipeline.core.stand_in import save_stand_in

                folder = save_stand_in(args.save_stand_in, args.profile, layers=args.layers or None, hf_home=args.hf_home)
                print(f"{args.profile}: stand-in (random weights, throughput only) saved to {folder}")
                return 0
            if args.fetch:
                print(f"{args.profile}: cached at {fetch_model(args.profile)}")
            print(json.dumps(check_model(args.profile)))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
