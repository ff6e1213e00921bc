"""A central scheduler started by hand from a fresh clone's root comes up.

README's "Several workers" says to start one ``luigid``; run from the repository root it
reads luigi.cfg, whose state and task history live under ``var/luigi``. In the background
a luigid that cannot open them dies at once, saying so only in its log, so the folder
ships with the repository. The test builds what a fresh clone has (luigi.cfg and the
tracked files under var/) in an empty folder and starts luigid there, as a user would."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, free_port, luigi_env


def wait_for_daemon(pid: int, port: int, timeout: float = 30) -> bool:
    """Whether the daemon answers on ``port`` before it ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            time.sleep(0.1)
    return False


def fresh_clone_files(folder: Path) -> None:
    """luigi.cfg and var/ as ``git clone`` leaves them."""
    try:
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "var"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the repository's tracked files cannot be listed here: {error}")
    shutil.copy(ROOT / "luigi.cfg", folder / "luigi.cfg")
    for name in tracked.stdout.split():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)


def test_luigid_started_in_the_background_from_the_root_comes_up(tmp_path):
    root = tmp_path / "clone"
    root.mkdir()
    fresh_clone_files(root)
    port, pidfile = free_port(), tmp_path / "luigid.pid"
    luigid = Path(sys.executable).parent / "luigid"
    started = subprocess.run(
        [str(luigid), "--background", "--address", "127.0.0.1", "--port", str(port), "--pidfile", str(pidfile),
         "--logdir", str(tmp_path / "log")],
        cwd=root, env=luigi_env(), capture_output=True, text=True, timeout=60,
    )
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text().strip():  # the daemon writes it after the parent returns
        assert time.monotonic() < deadline, "luigid --background wrote no pidfile"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        answering = wait_for_daemon(pid, port)
        logs = "\n".join(path.read_text() for path in (tmp_path / "log").glob("*"))
        assert answering, f"luigid (pid {pid}) ended before it answered on port {port}; its log:\n{logs[-2000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data=%7B%7D", timeout=10) as response:
            assert response.status == 200
        assert (root / "var" / "luigi" / "task-history.db").exists()  # the history luigi.cfg asks for
    finally:
        subprocess.run(["kill", str(pid)], check=False)
