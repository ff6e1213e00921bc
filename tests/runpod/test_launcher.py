"""RunpodEmbedAll against the fake Runpod API, whose pods run the container's
entrypoint (the watchdog) as local processes. Every scenario ends with no pod billed."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import luigi
import pytest

from fake_runpod import FakeRunpod, LocalProcesses, assert_no_pod_billed
from helpers import EDITS, ROOT, api, embed_here, luigi_command, luigi_env, running_luigid, wait_for, write_corpus
from pipeline import RunpodEmbedAll
from pipeline.core.sync import last_sync
from pipeline.errors import PipelineError
from pipeline.output.ledger import PodLedger, cost_report
from pipeline.runpod.orchestrator import PodLimit
from pipeline.core.shard_file import shard_stats
from pipeline.output.verify import verify_output

pytestmark = pytest.mark.slow


@pytest.fixture
def fake(monkeypatch, tmp_path):
    pod_env = luigi_env(HOME=str(tmp_path), PIPELINE_WATCHDOG_CHECK_SECONDS="0.2")
    api = FakeRunpod(provisioning_seconds=0.1, pod_runtime=LocalProcesses([sys.executable, "-m", "pipeline.runpod.watchdog"], pod_env, str(ROOT),
                                                                           tmp_root=str(tmp_path / "pods-tmp")))
    for key, value in {"RUNPOD_API_BASE_URL": api.url, "RUNPOD_API_KEY": api.api_key, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    yield api
    try:
        assert_no_pod_billed(api)
    finally:
        api.stop()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", documents=12, words=300)


def task(corpus, output, **extra):
    return RunpodEmbedAll(**{"corpus": str(corpus), "output": str(output), "docs_per_shard": 3, "image": "registry.local/embedding:test",
                             "poll_seconds": 0.2, "model": "minilm", **extra})


def launcher_env(fake):
    return luigi_env(RUNPOD_API_BASE_URL=fake.url, RUNPOD_API_KEY=fake.api_key, HOME=os.environ["HOME"])


def launcher_args(corpus, output):
    return ["RunpodEmbedAll", "--local-scheduler", "--corpus", str(corpus), "--output", str(output), "--docs-per-shard", "3",
            "--image", "registry.local/embedding:test", "--poll-seconds", "0.2", "--model", "minilm"]


def test_happy_path_embeds_on_the_pod_and_ends_it(fake, corpus, tmp_path):
    output = tmp_path / "out"
    assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    assert (output / "_SUCCESS.json").exists() and len(list((output / "shards").glob("*.parquet"))) == 4
    [pod] = fake.pods.values()
    assert pod.env["PIPELINE_OUTPUT"] == str(output) and pod.image_name == "registry.local/embedding:test"
    wait_for(lambda: not fake.running_pods())
    report = cost_report(str(output))
    assert report["running"] == 0 and report["dollars"] == pytest.approx(fake.dollars(pod.id), abs=pod.cost_per_hr / 3600)  # within a second


def test_new_documents_are_added_by_the_launcher_and_embedded_on_a_pod(fake, corpus, tmp_path):
    """The output made before (here, in this process: the happy path above makes one on a
    pod) is extended: no pod when nothing is new, one for the new documents alone."""
    output = tmp_path / "out"
    embed_here(corpus, output, docs_per_shard=3, model="minilm")
    assert luigi.build([task(corpus, output, add_new_documents=True)], local_scheduler=True, log_level="WARNING")
    assert len(fake.pods) == 0, "a pod was started with nothing new to embed"

    for name in ("added-1.md", "added-2.md"):
        (corpus / name).write_text(f"# {name}\n\nA document added to the corpus after the first run.\n")
    finished = {p.name: p.read_bytes() for p in (output / "shards").glob("*.parquet")}
    assert luigi.build([task(corpus, output, add_new_documents=True)], local_scheduler=True, log_level="WARNING")
    assert len(fake.pods) == 1
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert (summary["documents"], summary["shards"]) == (14, 5)
    assert all((output / "shards" / name).read_bytes() == data for name, data in finished.items())
    assert verify_output(str(output)).ok


def test_a_sync_is_recorded_by_the_launcher_and_embedded_on_a_pod(fake, corpus, tmp_path):
    """``RunpodEmbedAll --sync``: the launcher syncs the manifest before any pod starts,
    starts none when nothing changed, and the pod embeds the new shards only."""
    output = tmp_path / "out"
    embed_here(corpus, output, docs_per_shard=3, model="minilm")  # as the test above
    assert luigi.build([task(corpus, output, sync=True)], local_scheduler=True, log_level="WARNING")
    assert len(fake.pods) == 0, "a pod was started with nothing changed"
    EDITS[0](corpus)
    finished = {p.name: p.read_bytes() for p in (output / "shards").glob("*.parquet")}
    assert luigi.build([task(corpus, output, sync=True)], local_scheduler=True, log_level="WARNING")
    assert len(fake.pods) == 1
    assert {k: v for k, v in last_sync(str(output)).items() if k in ("added", "changed", "moved", "deleted")} == {
        "added": 1, "changed": 3, "moved": 1, "deleted": 1}
    assert all((output / "shards" / name).read_bytes() == data for name, data in finished.items())
    assert verify_output(str(output)).ok


def test_a_failure_inside_the_pod_fails_the_task_and_ends_the_pod(fake, corpus, tmp_path):
    fake.pod_runtime.base_env["PIPELINE_MODEL_PATH"] = str(tmp_path / "no-model-here")
    assert not luigi.build([task(corpus, tmp_path / "out")], local_scheduler=True, log_level="WARNING")
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_the_launcher_ends_a_pod_whose_container_would_linger(fake, corpus, tmp_path):
    """The work finishes but the container never ends itself: only the launcher can."""
    work = " ".join(luigi_command("EmbedAll", "--local-scheduler"))
    fake.pod_runtime.command = ["sh", "-c", f"{work} && exec sleep 600"]
    output = tmp_path / "out"
    assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    [record] = PodLedger(str(output)).records()
    assert record["end_reason"] in ("done", "launcher finished") and fake.pods[record["pod_id"]].terminated_at


def test_ctrl_c_of_the_launcher_ends_the_pod(fake, corpus, tmp_path):
    fake.pod_runtime.command = [sys.executable, "-c", "import time; time.sleep(600)"]  # a pod that never ends itself
    output = tmp_path / "out"
    with open(tmp_path / "launcher.log", "w") as log_file:
        launcher = subprocess.Popen(luigi_command(*launcher_args(corpus, output)), cwd=ROOT, env=launcher_env(fake),
                                    stdout=log_file, stderr=subprocess.STDOUT)
    signal_when(launcher, lambda: fake.pods)
    log = (tmp_path / "launcher.log").read_text()
    assert launcher.returncode != 0
    records = PodLedger(str(output)).records()
    assert len(records) == 1, log
    [record] = records
    # A signal during pod creation leaves the pod to the sweep, which records the same cause.
    assert record["end_reason"].startswith("launcher got SIGINT") and fake.pods[record["pod_id"]].terminated_at


def test_a_launcher_killed_outright_leaves_the_pod_to_finish_and_end_itself(fake, corpus, tmp_path):
    output = tmp_path / "out"
    launcher = subprocess.Popen(luigi_command(*launcher_args(corpus, output)), cwd=ROOT, env=launcher_env(fake),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: fake.pods)
    finally:
        launcher.kill()
        launcher.wait()
    wait_for(lambda: not fake.running_pods(), timeout=180)  # the watchdog ended it
    assert (output / "_SUCCESS.json").exists()


def shard_times(output):
    return {p.name: p.stat().st_mtime_ns for p in (output / "shards").glob("*.parquet")}


def interrupt_after_the_first_shard(fake, corpus, output, interrupt, *extra_args):
    """Launch, wait for a published shard, ``interrupt(pod_id)``, then let the launcher
    finish. Returns (pod id, the launcher's exit code and stderr, shards published before)."""
    launcher = subprocess.Popen(luigi_command(*launcher_args(corpus, output), *extra_args), cwd=ROOT,
                                env=launcher_env(fake), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list((output / "shards").glob("*.parquet"))) >= 1 if (output / "shards").exists() else False)
        [pod_id] = fake.pods
        before = shard_times(output)
        interrupt(pod_id)
        _, stderr = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return pod_id, launcher.returncode, stderr, before


def test_a_crashed_container_fails_the_run_and_a_rerun_resumes(fake, corpus, tmp_path):
    output = tmp_path / "out"
    pod_id, code, stderr, _ = interrupt_after_the_first_shard(fake, corpus, output, fake.crash)
    assert code != 0 and "ended before the work was done" in stderr
    assert fake.pods[pod_id].terminated_at, "the launcher did not terminate the crashed pod"
    before = shard_times(output)

    assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    assert (output / "_SUCCESS.json").exists() and len(fake.pods) == 2
    assert all((output / "shards" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert len(PodLedger(str(output)).records()) == 2


def test_a_container_that_runpod_restarts_after_a_crash_resumes_and_finishes(fake, corpus, tmp_path):
    fake.restart_exited_containers = True
    output = tmp_path / "out"
    pod_id, code, stderr, before = interrupt_after_the_first_shard(fake, corpus, output, fake.crash)
    assert code == 0, stderr
    assert fake.pods[pod_id].restarts >= 1 and len(fake.pods) == 1
    assert (output / "_SUCCESS.json").exists() and len(list((output / "shards").glob("*.parquet"))) == 4
    assert all((output / "shards" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())


def test_a_spot_pod_taken_back_is_replaced_and_the_work_resumes(fake, corpus, tmp_path):
    output = tmp_path / "out"
    first, code, stderr, before = interrupt_after_the_first_shard(fake, corpus, output, fake.preempt, "--spot")
    assert code == 0, stderr
    assert len(fake.pods) == 2 and all(pod.interruptible for pod in fake.pods.values())
    records = {r["pod_id"]: r for r in PodLedger(str(output)).records()}
    assert records[first]["end_reason"] == "spot pod taken back"
    assert (output / "_SUCCESS.json").exists() and len(list((output / "shards").glob("*.parquet"))) == 4
    assert all((output / "shards" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())


def test_three_pods_share_the_run_on_one_scheduler_and_all_end(fake, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=36, words=300)
    output = tmp_path / "out"
    with running_luigid(tmp_path / "luigid") as port:
        seen, stop = set(), threading.Event()

        def watch_workers():  # luigid lists live workers only: collect them while the run goes on
            while not stop.wait(0.1):
                seen.update(worker["name"] for worker in api(port, "worker_list"))

        watcher = threading.Thread(target=watch_workers)
        watcher.start()
        try:
            assert luigi.build([task(corpus, output, pods=3, pods_scheduler_url=f"http://127.0.0.1:{port}", max_dollars=25)],
                               local_scheduler=True, log_level="WARNING")
        finally:
            stop.set()
            watcher.join()
    assert (output / "_SUCCESS.json").exists() and len(list((output / "shards").glob("*.parquet"))) == 12
    assert len(fake.pods) == 3 and all(pod.env["LAUNCH_SCHEDULER_URL"] == f"http://127.0.0.1:{port}" for pod in fake.pods.values())
    assert len(seen) == 3, seen  # each pod was a worker on the one scheduler
    # Each pod's worker ended well (its watchdog says "finished"), or was still at it when the launcher ended it.
    reasons = [record["end_reason"] for record in PodLedger(str(output)).records()]
    assert len(reasons) == 3 and all(reason in ("watchdog: finished", "done", "launcher finished") for reason in reasons), reasons
    wait_for(lambda: not fake.running_pods())
    report = cost_report(str(output))
    assert len(report["pods"]) == 3 and report["running"] == 0
    # (the fake fixture then checks each pod's dollars against the fake's clock)
    # The run's budget is shared: each pod's watchdog got a third of it.
    shares = [float(pod.env["LAUNCH_WATCHDOG_MAX_DOLLARS"]) for pod in fake.pods.values()]
    assert all(25 / 3 - 0.01 < share <= 25 / 3 + 1e-4 for share in shares), shares


def test_a_pod_with_two_gpus_runs_a_worker_on_each_and_is_billed_for_both(fake, corpus, tmp_path):
    output = tmp_path / "out"
    assert luigi.build([task(corpus, output, gpus_per_pod=2)], local_scheduler=True, log_level="WARNING")
    [pod] = fake.pods.values()
    assert pod.gpu_count == 2
    stats = [shard_stats(str(path)) for path in (output / "shards").glob("shard-*.parquet")]
    assert len(stats) == 4 and {s["cuda_visible_devices"] for s in stats} <= {"0", "1"}
    assert len({s["worker"] for s in stats}) == 2, "both GPUs' workers made shards"
    wait_for(lambda: not fake.running_pods())
    [record] = cost_report(str(output))["pods"]
    assert record["gpu_count"] == 2 and record["price_per_hour"] == pytest.approx(pod.cost_per_hr)
    assert record["dollars"] == pytest.approx(fake.dollars(pod.id), abs=pod.cost_per_hr / 3600)  # within a second


def test_several_pods_without_a_scheduler_are_refused_before_any_pod_starts(fake, corpus, tmp_path):
    with pytest.raises(PipelineError, match=r"^--pods 2 needs --pods-scheduler-url"):
        task(corpus, tmp_path / "out", pods=2).run()
    assert not fake.pods


def test_without_an_image_it_builds_one_first_and_says_what_is_missing(fake, corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_REGISTRY", raising=False)
    with pytest.raises(PipelineError, match=r"^PIPELINE_REGISTRY is not set"):
        run_in_this_process(task(corpus, tmp_path / "out", image=""))
    assert fake.pods == {}


# -- the launcher's own limits, orphans and signals (issue 18) ---------------------------


def run_in_this_process(launcher):
    """The launcher's run() itself, after its manifest, so a test sees what it raises."""
    if not launcher.requires().complete():
        assert luigi.build([launcher.requires()], local_scheduler=True, log_level="WARNING")
    launcher.set_status_message = launcher.set_progress_percentage = lambda _value: None  # what a worker gives it
    launcher.run()


def test_a_running_pod_whose_container_never_starts_is_ended_at_the_spend_limit(fake, corpus, tmp_path):
    """No watchdog runs in the pod: only the launcher can hold it to --max-dollars."""
    fake.start_containers = False
    output = tmp_path / "out"
    budget = 0.0003  # about three seconds of an RTX 4090 at $0.34/h
    with pytest.raises(PodLimit, match=r"spend limit: \$0\.000\d+ spent of --max-dollars 0\.0003"):
        run_in_this_process(task(corpus, output, max_dollars=budget))
    [pod] = fake.pods.values()
    assert pod.terminated_at, "the pod was left billing"
    one_look = pod.cost_per_hr * 0.2 / 3600
    assert fake.dollars(pod.id) <= budget + one_look, f"spent {fake.dollars(pod.id)} against {budget}"
    assert PodLedger(str(output)).get(pod.id)["end_reason"].startswith("launcher: spend limit")


def test_a_pod_stuck_starting_is_held_to_the_spend_limit_too(fake, corpus, tmp_path, caplog):
    """Provisioning is billed: the limit is judged while a pod starts, with a live line."""
    fake.stuck_provisioning = True
    output = tmp_path / "out"
    launcher = task(corpus, output, max_dollars=0.0003)
    assert luigi.build([launcher.requires()], local_scheduler=True, log_level="WARNING")
    with caplog.at_level("INFO", logger="luigi-interface"), pytest.raises(PodLimit, match="while it was starting"):
        run_in_this_process(launcher)
    [pod] = fake.pods.values()
    assert fake.dollars(pod.id) <= 0.0003 + pod.cost_per_hr * 0.2 / 3600
    assert re.search(rf"pod {pod.id} starting: \$0\.\d{{4}} of \$0\.0003 \(\$0\.340/h\); ended if not running within 20m00s", caplog.text)
    assert PodLedger(str(output)).get(pod.id)["end_reason"].startswith("launcher: spend limit")


def test_a_running_pod_that_makes_no_shard_is_ended_at_the_first_shard_deadline(fake, corpus, tmp_path):
    fake.start_containers = False
    output = tmp_path / "out"
    launcher = subprocess.run(luigi_command(*launcher_args(corpus, output), "--first-shard-seconds", "2"), cwd=ROOT,
                              env=launcher_env(fake), capture_output=True, text=True, timeout=120)
    assert launcher.returncode == 30, launcher.stderr[-3000:]
    [record] = PodLedger(str(output)).records()
    assert record["end_reason"] == "launcher: no shard within 2s of the pod running (--first-shard-seconds)"
    assert "ERROR: no shard within 2s of the pod running (--first-shard-seconds): ended pod(s)" in launcher.stderr
    assert "Traceback" not in launcher.stderr
    # The live line came before any shard did.
    assert re.search(r"pod fakepod\d+: 0/4 shards done, 0 tokens/s, ETA unknown, \$0\.\d{4} of \$25 \(\$0\.340/h\); first shard due within", launcher.stderr)


def test_a_pod_that_stops_making_shards_is_ended_at_the_idle_deadline(fake, corpus, tmp_path):
    one_shard = " ".join(luigi_command("EmbedShard", "--local-scheduler", "--shard", "0"))
    fake.pod_runtime.command = ["sh", "-c", f"{one_shard} && exec sleep 600"]  # one shard, then it hangs
    output = tmp_path / "out"
    with pytest.raises(PodLimit, match="no new shard for 3s"):
        run_in_this_process(task(corpus, output, idle_seconds=3))
    assert len(list((output / "shards").glob("*.parquet"))) == 1
    [record] = PodLedger(str(output)).records()
    assert record["end_reason"] == "launcher: no new shard for 3s (--idle-seconds)"
    assert fake.pods[record["pod_id"]].env["LAUNCH_WATCHDOG_IDLE_SECONDS"] == "1800"  # the watchdog: max(idle, first shard)


def signal_when(launcher, ready, signal_number=signal.SIGINT) -> None:
    """Send the launcher a signal once ``ready()``, and wait for it to end (killed if it does not)."""
    try:
        wait_for(ready)
        launcher.send_signal(signal_number)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def start_launcher(fake, corpus, output, log_path, *extra):
    with open(log_path, "w") as log_file:
        return subprocess.Popen(luigi_command(*launcher_args(corpus, output), *extra), cwd=ROOT, env=launcher_env(fake),
                                stdout=log_file, stderr=subprocess.STDOUT)


def test_a_relaunch_ends_the_pod_a_killed_launcher_left_and_says_so(fake, corpus, tmp_path, caplog):
    fake.start_containers = False  # its pod would bill for ever: no watchdog runs in it
    output = tmp_path / "out"
    launcher = start_launcher(fake, corpus, output, tmp_path / "launcher.log")
    try:
        wait_for(lambda: fake.pods and (output / "_runs" / "launchers").exists() and PodLedger(str(output)).records())
        [orphan] = fake.pods
        launcher.kill()  # SIGKILL: nothing of the launcher runs again
    finally:
        launcher.kill()
        launcher.wait()
    assert PodLedger(str(output)).get(orphan)["stopped_at_epoch"] is None and not fake.pods[orphan].terminated_at

    fake.start_containers = True
    with caplog.at_level("WARNING", logger="luigi-interface"):
        assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    assert f"pod {orphan} of run" in caplog.text and "its launcher is gone: terminating it" in caplog.text
    assert fake.pods[orphan].terminated_at and len(fake.pods) == 2
    record = PodLedger(str(output)).get(orphan)
    assert record["end_reason"].startswith("orphan: its launcher was gone")
    assert not list((output / "_runs" / "launchers").glob("*.json")), "a finished launcher left its lease"


def test_a_launch_beside_a_live_launcher_refuses_and_starts_no_pod(fake, corpus, tmp_path):
    fake.start_containers = False
    output = tmp_path / "out"
    first = start_launcher(fake, corpus, output, tmp_path / "first.log")
    try:
        wait_for(lambda: fake.pods and PodLedger(str(output)).records())
        with pytest.raises(PipelineError, match=r"launcher \(pid \d+ on .*\) is still following pod\(s\) fakepod0001 .*pods sweep"):
            run_in_this_process(task(corpus, output))
        assert list(fake.pods) == ["fakepod0001"] and not fake.pods["fakepod0001"].terminated_at
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert PodLedger(str(output)).get("fakepod0001")["end_reason"] == "launcher got SIGTERM"


@pytest.mark.parametrize("signal_number, extra", [(signal.SIGINT, []), (signal.SIGTERM, ["--spot"])])
def test_a_signal_ends_the_launcher_with_one_line_and_exit_30(fake, corpus, tmp_path, signal_number, extra):
    """With --spot too: the pods the signal ended are not spot pods taken back, to be replaced."""
    fake.pod_runtime.command = [sys.executable, "-c", "import time; time.sleep(600)"]  # a pod that never ends itself
    output = tmp_path / "out"
    launcher = start_launcher(fake, corpus, output, tmp_path / "launcher.log", *extra)
    signal_when(launcher, lambda: any(p.provisioned_at and time.time() > p.provisioned_at for p in fake.pods.values())
                and "first shard due" in (tmp_path / "launcher.log").read_text(), signal_number)
    log = (tmp_path / "launcher.log").read_text()
    name = signal.Signals(signal_number).name
    [pod_id] = fake.pods
    assert launcher.returncode == 30, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert f"ERROR: launcher got {name}: ended this run's pod(s) ({pod_id}); finished shards are kept" in log
    assert log.count(f"terminated pod {pod_id}") == 1, log[-3000:]
    assert log.count("runpod: started pod") == 1, "a log line was printed twice"
    assert "which a Runpod pod cannot read" in log  # a local corpus and output
    assert PodLedger(str(output)).get(pod_id)["end_reason"] == f"launcher got {name}"


def test_ctrl_c_while_a_pod_provisions_says_so_in_one_line(fake, corpus, tmp_path):
    """The handler ends the pod at once; the launcher's next poll then finds it gone, and
    must say the signal ended it, not that it "disappeared while starting"."""
    fake.stuck_provisioning = True
    output = tmp_path / "out"
    launcher = start_launcher(fake, corpus, output, tmp_path / "launcher.log")
    signal_when(launcher, lambda: fake.pods and " starting: $" in (tmp_path / "launcher.log").read_text())
    log = (tmp_path / "launcher.log").read_text()
    [pod_id] = fake.pods
    assert launcher.returncode == 30, log[-3000:]
    assert f"ERROR: launcher got SIGINT: ended this run's pod(s) ({pod_id})" in log, log[-3000:]
    assert "disappeared" not in log
    assert PodLedger(str(output)).get(pod_id)["end_reason"] == "launcher got SIGINT"


def test_a_launch_beside_a_launcher_still_looking_for_a_gpu_refuses_and_ctrl_c_stops_that_wait(fake, corpus, tmp_path):
    for gpu in fake.capacity:
        fake.capacity[gpu] = 0
    output = tmp_path / "out"
    first = start_launcher(fake, corpus, output, tmp_path / "first.log", "--capacity-seconds", "600")
    try:
        wait_for(lambda: list((output / "_runs" / "launchers").glob("*.json")) if (output / "_runs").exists() else False)
        with pytest.raises(PipelineError, match=r"is still running \(no pod of it is billed yet\)"):
            run_in_this_process(task(corpus, output))
        asked = time.monotonic()
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
        assert time.monotonic() - asked < 20, "the search for a GPU did not stop at Ctrl-C"
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 30 and fake.pods == {}
    assert "ERROR: launcher got SIGINT: ended this run's pod(s) (none had started)" in (tmp_path / "first.log").read_text()


def test_of_two_pods_the_one_whose_container_never_starts_is_ended_and_the_other_finishes(fake, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=36, words=300)
    fake.start_containers = lambda pod: pod.id != "fakepod0002"
    # Pod 1 works for well past pod 2's deadline: 4 s before each of its shards after the first.
    fake.pod_runtime.base_env.update(PYTHONPATH=str(ROOT / "tests" / "slow_shards"), TEST_SHARD_PAUSE_SECONDS="4")
    output = tmp_path / "out"
    with running_luigid(tmp_path / "luigid") as port:
        assert luigi.build([task(corpus, output, pods=2, pods_scheduler_url=f"http://127.0.0.1:{port}", first_shard_seconds=25)],
                           local_scheduler=True, log_level="WARNING")
    records = {r["pod_id"]: r for r in PodLedger(str(output)).records()}
    assert records["fakepod0002"]["end_reason"] == "launcher: pod fakepod0002 made no shard within 25s of running (--first-shard-seconds)"
    stats = [shard_stats(str(path)) for path in (output / "shards").glob("shard-*.parquet")]
    assert len(stats) == 12 and {s["pod_id"] for s in stats} == {"fakepod0001"}
    assert verify_output(str(output)).ok


def test_server_errors_on_create_and_polls_do_not_end_the_run(fake, corpus, tmp_path):
    output = tmp_path / "out"
    fake.failures = [None, None, "after-graphql-500", "graphql-500", None, "graphql-500", "drop", None, "graphql-500"]
    assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    assert len(fake.pods) == 1 and fake.failures == []
    assert verify_output(str(output)).ok


def test_cost_and_status_flag_a_pod_the_api_no_longer_knows_and_pods_sweep_ends_the_rest(fake, corpus, tmp_path):
    from pipeline.runpod.orchestrator import PodSettings, RunpodOrchestrator

    output = tmp_path / "out"
    assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    pods = RunpodOrchestrator(PodSettings(image="registry.local/embedding:test", env={"PIPELINE_OUTPUT": str(output)},
                                          poll_interval=0.05, api_max_wait=0.05), PodLedger(str(output)), api_key=fake.api_key)
    fake.start_containers = False  # pods that stay until something ends them
    gone, billed = pods.start_pod(), pods.start_pod()
    fake._podTerminate({"podId": gone})  # ended behind the ledger's back (the console, say)
    env = launcher_env(fake)

    def command(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    cost = command("cost", str(output))
    assert f"{gone} " in cost.stdout and "RUNNING in the ledger, but the API no longer shows it" in cost.stdout, cost.stdout
    assert f"1 of them ({gone}) the Runpod API no longer shows" in cost.stdout
    status = command("status", str(output))
    assert f"of which {gone} the Runpod API no longer shows" in status.stdout, status.stdout + status.stderr

    swept = command("pods", "sweep", str(output))
    assert swept.returncode == 0, swept.stderr
    assert f"terminated pod {billed}" in swept.stdout and f"closed the record of pod {gone}" in swept.stdout
    assert fake.pods[billed].terminated_at and not fake.running_pods()
    assert PodLedger(str(output)).get(billed)["end_reason"] == "ended by `pods sweep`"
    assert "still running" not in command("cost", str(output)).stdout
    # When a gone pod ended is unknown: its record ends when it was found gone, an upper bound.
    assert PodLedger(str(output)).get(gone)["stopped_at_epoch"] >= fake.pods.pop(gone).terminated_at


def test_max_dollars_bounds_the_outputs_spend_over_all_its_launches(fake, corpus, tmp_path, caplog):
    """Two launches of one budget used to spend it twice (and a retry loop N times): the
    ledger already knows what earlier launches spent, a relaunch gets what is left and
    says so, and a launch with nothing left starts no pod."""
    fake.start_containers = False  # no watchdog: the launcher alone holds the pods to the budget
    output = tmp_path / "out"
    budget = 0.0003
    with pytest.raises(PodLimit, match="spend limit"):
        run_in_this_process(task(corpus, output, max_dollars=budget))
    spent = cost_report(str(output))["dollars"]
    with caplog.at_level("INFO", logger="luigi-interface"), pytest.raises(PodLimit, match="spend limit"):
        run_in_this_process(task(corpus, output, max_dollars=budget))  # a pod only if more than a look is left
    assert f"this output's earlier launches spent ${spent:.4f} of --max-dollars 0.0003" in caplog.text
    a_second = 0.34 / 3600  # the look-ahead is a poll or the longest look: a busy machine's slack
    assert sum(fake.dollars(pod.id) for pod in fake.pods.values()) <= budget + a_second
    pods, spent = len(fake.pods), cost_report(str(output))["dollars"]
    with pytest.raises(PodLimit) as third:
        run_in_this_process(task(corpus, output, max_dollars=spent))
    assert len(fake.pods) == pods, "a launch started a pod with the budget already spent"
    assert "no new pod started" in str(third.value) and "rerun with a larger --max-dollars" in str(third.value)


def test_a_refused_api_key_is_one_line_and_no_talk_of_pods_to_end(fake, corpus, tmp_path, caplog, monkeypatch):
    """No pod can exist under a key the API refuses: the run fails on the refusal alone."""
    launcher = task(corpus, tmp_path / "out")
    monkeypatch.setenv("RUNPOD_API_KEY", "wrong-key")
    with caplog.at_level("INFO", logger="luigi-interface"), pytest.raises(PipelineError, match="API key was refused"):
        run_in_this_process(launcher)
    assert not fake.pods
    assert "check the Runpod console" not in caplog.text and "ending this run's pods" not in caplog.text, caplog.text


def test_a_pod_terminated_by_someone_else_is_recorded_so(fake, corpus, tmp_path):
    """Neither the launcher nor the pod's watchdog ended it: the ledger says that, not that
    it merely 'ended before the run was done'."""
    fake.start_containers = False
    output = tmp_path / "out"

    def terminate_from_the_console():
        wait_for(lambda: any(pod.provisioned_at and time.time() > pod.provisioned_at + 0.5 for pod in fake.pods.values()))
        fake._podTerminate({"podId": next(iter(fake.pods))})

    console = threading.Thread(target=terminate_from_the_console)
    console.start()
    try:
        with pytest.raises(PipelineError, match="ended before the work was done"):
            run_in_this_process(task(corpus, output, first_shard_seconds=60))
    finally:
        console.join()
    [pod_id] = fake.pods
    assert PodLedger(str(output)).get(pod_id)["end_reason"].startswith("terminated outside this launcher and its watchdog")


def test_each_look_reads_the_ledger_records_of_running_pods_only(fake, corpus, tmp_path, monkeypatch):
    """An output that has run thousands of pods on a bucket: each look read every record
    (two reads a pod). Earlier launches' records, all ended, are read once per launch."""
    from pipeline import storage
    from pipeline.output.ledger import ledger_record

    output = tmp_path / "out"
    ledger = PodLedger(str(output))
    for number in range(30):  # thirty pods of earlier launches, long ended
        record = ledger_record(f"earlier{number:03d}", f"embedding-pipeline-old-{number}", "old", "NVIDIA GeForce RTX 4090",
                               1, "ALL", 0.34, "img", time.time() - 7200)
        ledger.mark_ended(record, "launcher finished", time.time() - 3600)
        ledger.record(record)
    reads, real = [], storage.read_text
    monkeypatch.setattr(storage, "read_text", lambda path: reads.append(path) or real(path))
    assert luigi.build([task(corpus, output)], local_scheduler=True, log_level="WARNING")
    earlier = [path for path in reads if "/earlier" in path]
    assert len(set(earlier)) == 30 and len(earlier) <= 30 * 3, f"{len(earlier)} reads of 30 ended records"
