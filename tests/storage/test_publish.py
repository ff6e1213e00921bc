"""Atomic publish and stale temp files."""

import os
import subprocess
import sys

import pytest

from pipeline.storage import atomic_output, remove_stale_temps, temp_name_for


def test_atomic_output_publishes_whole_files_and_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "shards" / "shard-000000.parquet"
    with atomic_output(str(dest)) as staged:
        staged.path.write_bytes(b"complete")
    assert dest.read_bytes() == b"complete" and staged.published
    with pytest.raises(RuntimeError):
        with atomic_output(str(dest)) as staged:
            staged.path.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert dest.read_bytes() == b"complete"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["shard-000000.parquet"]


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_exactly_once_publish_keeps_the_first_writers_file(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # some network filesystems refuse them

        def no_links(*args):
            raise PermissionError("hard links not supported here")

        monkeypatch.setattr(os, "link", no_links)
    dest = tmp_path / "shard-000000.parquet"
    with atomic_output(str(dest), overwrite=False) as first:
        first.path.write_bytes(b"first")
    with atomic_output(str(dest), overwrite=False) as second:
        second.path.write_bytes(b"second")
    assert (first.published, second.published) == (True, False)
    assert dest.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.parquet"]


def test_only_temps_of_dead_writers_are_removed(tmp_path):
    dest = str(tmp_path / "shard-000001.parquet")
    live = temp_name_for(dest)  # this process: alive
    live.write_bytes(b"in progress")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    dead = live.with_name(live.name.replace(f".{os.getpid()}@", f".{dead_pid}@"))
    dead.write_bytes(b"abandoned")
    other = tmp_path / ".shard-000002.parquet.1@elsewhere.0123abcd.tmp"  # another shard
    other.write_bytes(b"not ours")
    assert remove_stale_temps(dest) == 1
    assert live.exists() and not dead.exists() and other.exists()
