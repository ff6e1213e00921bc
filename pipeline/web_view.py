"""What the Luigi web view shows while a run works: each task's own line and, on the run
task, the whole run's figures (shards done, rates, ETA, dollars, shards that failed).

A run task waits (PENDING) while its shards run, so it cannot report itself: each shard
posts the run's figures for it, through the scheduler its worker reports to. Luigi gives
a task no public handle on that scheduler; ``scheduler_of`` is the one place that takes
it from Luigi's private attributes, and tests/test_web_view.py runs it against a real
luigid, so a Luigi upgrade that moves it fails there.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import luigi

from pipeline.output.status import RunWatch

log = logging.getLogger("luigi-interface")

# One watch per run in this worker process, so the rates span every shard it runs.
_watches: dict[str, RunWatch] = {}


def show(task: luigi.Task, message: str, percent: int) -> None:
    """A task's own line and progress bar."""
    task.set_status_message(message)
    task.set_progress_percentage(percent)


def scheduler_of(task: luigi.Task) -> Optional[Any]:
    """The scheduler the worker running ``task`` reports to (luigi hands a running task
    its reporter's bound methods); None when the task runs outside a worker."""
    reporter = getattr(task.set_status_message, "__self__", None)
    return getattr(reporter, "_scheduler", None)


def post_run_figures(shard_task: luigi.Task, run_task_id: str, output: str, total_shards: int, shard: int,
                     failed: bool = False) -> None:
    """Post the run's figures on its run task as one of its shards starts, ends or fails.
    A figure never fails a shard.

    Args:
        shard_task: the running shard task, whose worker's scheduler is used.
        run_task_id: the task the figures are posted on (its EmbedAll).
        output: the run's output, whose shards are counted.
        total_shards: the manifest's shard count.
        shard: the shard's number.
        failed: the shard failed: listed until a later try makes it.
    """
    scheduler = scheduler_of(shard_task)
    if scheduler is None:
        return
    try:
        watch = _watches.setdefault(run_task_id, RunWatch(output, total_shards, shared_listing=True))
        (watch.failed.add if failed else watch.failed.discard)(shard)
        message, percent = watch.figures()
        scheduler.set_task_status_message(run_task_id, message)
        scheduler.set_task_progress_percentage(run_task_id, percent)
    except Exception as exc:
        log.warning("could not post the run's progress to the scheduler: %s", exc)
