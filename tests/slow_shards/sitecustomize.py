"""Makes a test run slow without making it busy: put this folder on PYTHONPATH and set
TEST_SHARD_PAUSE_SECONDS (a wait before each shard after a process's first) or
TEST_BATCH_PAUSE_SECONDS (a wait after each batch the model embeds), and every Python
process started with that environment (a pod's watchdog and the Luigi workers it
spawns) waits that long. A run then outlasts a deadline, or shows a shard running for
a while, without embedding hundreds of documents.

The waits are patched in when ``pipeline.core.shard_job`` is first imported, not here:
importing the pipeline this early would run before ``sys.argv`` is set and skip the
run preparation a ``luigi --module pipeline`` command needs."""

import importlib.abc
import importlib.machinery
import os
import sys
import time

SHARD_PAUSE_SECONDS = float(os.environ.get("TEST_SHARD_PAUSE_SECONDS") or 0)
BATCH_PAUSE_SECONDS = float(os.environ.get("TEST_BATCH_PAUSE_SECONDS") or 0)


def pause_shards(shard_job) -> None:
    run_shard, shards_run = shard_job.run_shard, []

    def paused_run_shard(*args, **kwargs):
        if shards_run:
            time.sleep(SHARD_PAUSE_SECONDS)
        shards_run.append(True)
        return run_shard(*args, **kwargs)

    shard_job.run_shard = paused_run_shard


def pause_batches(shard_job) -> None:
    embedder_class = shard_job.Embedder
    embed = embedder_class.embed

    def paused_embed(self, token_ids, on_batch=None, **kwargs):
        def heard(chunks, tokens):
            if on_batch:
                on_batch(chunks, tokens)
            time.sleep(BATCH_PAUSE_SECONDS)

        return embed(self, token_ids, on_batch=heard, **kwargs)

    embedder_class.embed = paused_embed


class _PauseShards(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.core.shard_job":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if SHARD_PAUSE_SECONDS:
                pause_shards(module)
            if BATCH_PAUSE_SECONDS:
                pause_batches(module)

        spec.loader.exec_module = exec_module
        return spec


if SHARD_PAUSE_SECONDS or BATCH_PAUSE_SECONDS:
    sys.meta_path.insert(0, _PauseShards())
