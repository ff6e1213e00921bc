"""Makes a test pod slow without making it busy: put this folder on PYTHONPATH and set
TEST_SHARD_PAUSE_SECONDS, and every Python process started with that environment (the
pod's watchdog and the Luigi workers it spawns) waits that long before each shard after
its first. A run then outlasts a deadline without embedding hundreds of documents.

The wait is patched in when ``pipeline.core.shard_job`` is first imported, not here:
importing the pipeline this early would run before ``sys.argv`` is set and skip the
run preparation a ``luigi --module pipeline`` command needs."""

import importlib.abc
import importlib.machinery
import os
import sys
import time

PAUSE_SECONDS = float(os.environ.get("TEST_SHARD_PAUSE_SECONDS") or 0)


class _PauseShards(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.core.shard_job":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            run_shard, shards_run = module.run_shard, []

            def paused_run_shard(*args, **kwargs):
                if shards_run:
                    time.sleep(PAUSE_SECONDS)
                shards_run.append(True)
                return run_shard(*args, **kwargs)

            module.run_shard = paused_run_shard

        spec.loader.exec_module = exec_module
        return spec


if PAUSE_SECONDS:
    sys.meta_path.insert(0, _PauseShards())
