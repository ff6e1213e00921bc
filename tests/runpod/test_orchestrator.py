"""RunpodOrchestrator driving the real runpod SDK against a fake Runpod API on loopback.

Every scenario ends with the fake's ledger showing no pod left running."""

import json
import threading

import pytest

from fake_runpod import GPU_TYPES, FakeRunpod
from pipeline.errors import PipelineError
from pipeline.output.ledger import PodLedger, cost_report
from pipeline.runpod.orchestrator import NoCapacity, PodError, PodLimit, PodSettings, PodStuck, RunpodOrchestrator
from pipeline.runpod.pod_env import decode_env

FAST = dict(provisioning_timeout=5, capacity_timeout=3, capacity_retry_wait=0.05, poll_interval=0.05, api_attempts=5, api_max_wait=0.05)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    api = FakeRunpod()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", api.url)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.runpod/config.toml from the machine
    yield api
    try:
        assert api.running_pods() == [], "a pod was left running"
    finally:
        api.stop()


def orchestrator(tmp_path, fake, **settings):
    return RunpodOrchestrator(PodSettings(image="registry.local/embedding:abc123", **{**FAST, **settings}), PodLedger(str(tmp_path / "out")), api_key=fake.api_key)


def test_happy_path_start_wait_terminate_and_the_ledger_matches_the_fake(tmp_path, fake):
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    record = pods.ledger.get(pod_id)  # written the moment create returned
    assert record["gpu_type"] == "NVIDIA GeForce RTX 4090" and record["stopped_at"] is None
    assert record["price_per_hour"] == GPU_TYPES["NVIDIA GeForce RTX 4090"]["communityPrice"]
    running = pods.wait_until_running(pod_id)
    assert running["runtime"] and running["desiredStatus"] == "RUNNING"
    pods.terminate_pod(pod_id)
    pods.terminate_pod(pod_id)  # twice is fine
    record = pods.ledger.get(pod_id)
    assert record["end_reason"] == "done"
    assert PodLedger.dollars(record) == pytest.approx(fake.dollars(pod_id), abs=1e-4)
    assert fake.requests.count("podTerminate") >= 1


def test_no_4090_capacity_falls_back_to_the_next_gpu_type(tmp_path, fake):
    fake.capacity["NVIDIA GeForce RTX 4090"] = 0
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    assert fake.pods[pod_id].gpu_type_id == "NVIDIA RTX A6000" == pods.ledger.get(pod_id)["gpu_type"]
    pods.terminate_pod(pod_id)


def test_an_unknown_gpu_type_is_skipped_for_the_next_one(tmp_path, fake, caplog):
    pods = orchestrator(tmp_path, fake, gpu_types=("NVIDIA GeForce RTX 9999", "NVIDIA GeForce RTX 4090"))
    with caplog.at_level("WARNING"):
        pod_id = pods.start_pod()
    assert fake.pods[pod_id].gpu_type_id == "NVIDIA GeForce RTX 4090"
    assert "'NVIDIA GeForce RTX 9999' is no GPU type the API knows" in caplog.text
    pods.terminate_pod(pod_id)


def test_waits_for_capacity_in_rounds_then_starts(tmp_path, fake):
    for gpu in fake.capacity:
        fake.capacity[gpu] = 0
    threading.Timer(0.3, lambda: fake.capacity.__setitem__("NVIDIA L40S", 1)).start()
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    assert fake.pods[pod_id].gpu_type_id == "NVIDIA L40S"
    pods.terminate_pod(pod_id)


def test_no_capacity_at_all_fails_clearly_and_starts_nothing(tmp_path, fake):
    for gpu in fake.capacity:
        fake.capacity[gpu] = 0
    with pytest.raises(NoCapacity, match="no capacity for NVIDIA GeForce RTX 4090, NVIDIA RTX A6000, NVIDIA L40S"):
        orchestrator(tmp_path, fake, capacity_timeout=0.3).start_pod()
    assert fake.pods == {}


def test_a_pod_stuck_provisioning_is_terminated_at_the_deadline(tmp_path, fake):
    fake.stuck_provisioning = True
    pods = orchestrator(tmp_path, fake, provisioning_timeout=0.3)
    pod_id = pods.start_pod()
    with pytest.raises(PodStuck, match="terminated it"):
        pods.wait_until_running(pod_id)
    assert pods.ledger.get(pod_id)["end_reason"] == "stuck provisioning"


def test_server_errors_and_rate_limits_are_retried(tmp_path, fake):
    fake.failures = [500, 429, "non-json", 503]
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    assert len(fake.pods) == 1
    pods.terminate_pod(pod_id)
    assert fake.failures == []


def test_an_answer_of_a_new_shape_fails_at_once_instead_of_being_retried(tmp_path, fake):
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    fake.failures = ["new-shape"]
    asked = len(fake.requests)
    with pytest.raises(PodError, match="lacks the field 'pod'"):
        pods.get_pod_status(pod_id)
    assert len(fake.requests) == asked, "a changed API shape was retried as if it were an outage"
    pods.terminate_pod(pod_id)


def test_a_pod_of_cloud_all_is_billed_at_its_own_price_not_the_lowest_listed(tmp_path, fake):
    fake.all_cloud_lands_on = "SECURE"
    pods = orchestrator(tmp_path, fake, cloud_type="ALL")
    pod_id = pods.start_pod()  # the listed price is the community one; the pod's own is read at once
    assert pods.ledger.get(pod_id)["price_per_hour"] == GPU_TYPES["NVIDIA GeForce RTX 4090"]["securePrice"]
    pods.wait_until_running(pod_id)
    pods.terminate_pod(pod_id)
    assert PodLedger.dollars(pods.ledger.get(pod_id)) == pytest.approx(fake.dollars(pod_id), abs=1e-4)


def test_a_spot_pod_is_rented_at_its_bid_and_billed_at_it(tmp_path, fake):
    pods = orchestrator(tmp_path, fake, spot=True, env={"NOTE": 'a "quoted" value'})
    pod_id = pods.start_pod()
    assert "podRentInterruptable" in fake.requests and fake.pods[pod_id].interruptible
    assert decode_env(fake.pods[pod_id].env)["NOTE"] == 'a "quoted" value'
    bid = GPU_TYPES["NVIDIA GeForce RTX 4090"]["communitySpotPrice"]
    assert pods.ledger.get(pod_id)["price_per_hour"] == bid == fake.pods[pod_id].cost_per_hr
    pods.wait_until_running(pod_id)
    pods.terminate_pod(pod_id)
    assert PodLedger.dollars(pods.ledger.get(pod_id)) == pytest.approx(fake.dollars(pod_id), abs=1e-4)


def test_a_gpu_without_a_spot_price_in_that_cloud_is_skipped_for_spot(tmp_path, fake):
    pods = orchestrator(tmp_path, fake, spot=True, cloud_type="COMMUNITY", gpu_types=("NVIDIA L40S", "NVIDIA RTX A6000"))
    pod_id = pods.start_pod()
    assert fake.pods[pod_id].gpu_type_id == "NVIDIA RTX A6000"
    pods.terminate_pod(pod_id)
    only_l40s = orchestrator(tmp_path, fake, spot=True, cloud_type="COMMUNITY", gpu_types=("NVIDIA L40S",))
    with pytest.raises(PodError, match="no spot price listed for NVIDIA L40S in cloud COMMUNITY"):
        only_l40s.start_pod()
    assert len(fake.pods) == 1


def test_a_create_whose_answer_was_lost_is_found_not_duplicated(tmp_path, fake):
    """The orphan-pod post-mortem: the pod was created, the answer was a 500."""
    pods = orchestrator(tmp_path, fake)
    # Requests: our price lookup, the SDK's own gpuTypes check, then the create mutation,
    # which the fake carries out before answering 500.
    fake.failures = [None, None, "after-500"]
    pod_id = pods.start_pod()
    assert fake.requests[:4] == ["gpuTypes", "gpuTypes", "podFindAndDeployOnDemand", "myself"]
    assert list(fake.pods) == [pod_id], "a second pod was created"
    assert pods.ledger.get(pod_id)["pod_id"] == pod_id
    pods.terminate_pod(pod_id)


def test_a_create_that_fails_for_good_after_making_the_pod_ends_it_and_records_it(tmp_path, fake):
    """An answer we do not retry (one of a new shape) to a create the server carried
    out: the pod is terminated, and the ledger still says when it ran and what it cost."""
    pods = orchestrator(tmp_path, fake)
    fake.failures = [None, None, "after-new-shape"]
    with pytest.raises(PodError, match="creating a NVIDIA GeForce RTX 4090 pod"):
        pods.start_pod()
    [pod_id] = fake.pods
    assert fake.pods[pod_id].terminated_at
    record = pods.ledger.get(pod_id)
    assert record["end_reason"] == "create failed"
    assert PodLedger.dollars(record) == pytest.approx(fake.dollars(pod_id), abs=1e-4)


def test_env_values_that_would_break_the_query_travel_encoded(tmp_path, fake):
    service_account = json.dumps({"type": "service_account", "private_key": "-----BEGIN KEY-----\nabc\n-----END KEY-----\n"}, indent=1)
    pods = orchestrator(tmp_path, fake, env={"GOOGLE_CREDENTIALS_JSON": service_account, "PIPELINE_OUTPUT": "gs://b/out"})
    pod_id = pods.start_pod()
    env = fake.pods[pod_id].env
    assert env["PIPELINE_OUTPUT"] == "gs://b/out" and "GOOGLE_CREDENTIALS_JSON" not in env
    assert decode_env(env) == {"GOOGLE_CREDENTIALS_JSON": service_account}
    pods.terminate_pod(pod_id)


def test_sweep_ends_this_runs_leftover_pods_only(tmp_path, fake):
    ours = orchestrator(tmp_path, fake)
    theirs = orchestrator(tmp_path / "other", fake)
    leftovers = [ours.start_pod(), ours.start_pod()]
    other = theirs.start_pod()
    assert sorted(ours.sweep()) == sorted(leftovers)
    assert [p.id for p in fake.running_pods()] == [other]
    theirs.terminate_pod(other)


def test_missing_or_refused_api_key_is_one_clear_error(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(PipelineError, match="RUNPOD_API_KEY is not set"):
        RunpodOrchestrator(PodSettings(image="x"), PodLedger(str(tmp_path)))
    pods = RunpodOrchestrator(PodSettings(image="x", **FAST), PodLedger(str(tmp_path)), api_key="wrong-key")
    with pytest.raises(PodError, match="API key was refused"):
        pods.start_pod()
    assert fake.pods == {}


def test_cost_report_adds_up_per_pod_per_run_and_in_total(tmp_path, fake):
    import subprocess
    import sys

    from helpers import ROOT, luigi_env
    from pipeline.output.ledger import cost_report

    first = orchestrator(tmp_path, fake)
    a, b = first.start_pod(), first.start_pod()
    second = orchestrator(tmp_path, fake)  # another run into the same output
    c = second.start_pod()
    for orch, pod_id in ((first, a), (first, b), (second, c)):
        orch.terminate_pod(pod_id)
    report = cost_report(str(tmp_path / "out"))
    assert [p["pod_id"] for p in report["pods"]] == [a, b, c]
    for pod in report["pods"]:
        assert pod["dollars"] == pytest.approx(fake.dollars(pod["pod_id"]), abs=1e-4)  # within a second of GPU time
    by_run = {r["run_id"]: r for r in report["runs"]}
    assert by_run[first.run_id]["pods"] == 2 and by_run[second.run_id]["pods"] == 1
    assert report["dollars"] == pytest.approx(sum(fake.dollars(p) for p in (a, b, c)), abs=3e-4)
    assert report["running"] == 0
    printed = subprocess.run([sys.executable, "-m", "pipeline", "cost", str(tmp_path / "out")], cwd=ROOT,
                             env=luigi_env(), capture_output=True, text=True, check=True).stdout
    assert f"run {first.run_id}: 2 pod(s)" in printed and printed.strip().splitlines()[-1] == f"total: ${report['dollars']:.4f}"


def test_a_terminate_answered_with_a_server_error_is_confirmed_and_retried(tmp_path, fake):
    """The SDK's terminate_pod returns normally on a 5xx: only the API's word counts."""
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    fake.failures = [500, 503]  # the first two terminate attempts are lost
    pods.terminate_pod(pod_id)
    assert fake.pods[pod_id].terminated_at is not None
    assert fake.requests.count("podTerminate") == 1 and fake.failures == []
    assert pods.ledger.get(pod_id)["end_reason"] == "done"


def test_a_pod_swept_before_its_record_was_written_still_lands_in_the_ledger(tmp_path, fake):
    """A signal between create returning and the ledger write: the sweep records it."""
    pods = orchestrator(tmp_path, fake)
    real_record = pods.ledger.record
    pods.ledger.record = lambda record: (_ for _ in ()).throw(KeyboardInterrupt("Ctrl-C before the record"))
    with pytest.raises(KeyboardInterrupt):
        pods.start_pod()
    pods.ledger.record = real_record
    [pod_id] = list(fake.pods)
    assert pods.sweep() == [pod_id]
    record = pods.ledger.get(pod_id)
    assert record["end_reason"] == "sweep"
    assert PodLedger.dollars(record) == pytest.approx(fake.dollars(pod_id), abs=1e-4)


def test_terminating_a_pod_the_api_no_longer_knows_is_done_whatever_the_error_says(tmp_path, fake, monkeypatch):
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    pods.terminate_pod(pod_id)

    def unknown_wording(_pod_id):
        raise RuntimeError("Something unexpected about this pod")

    monkeypatch.setattr(pods.runpod, "terminate_pod", unknown_wording)
    pods.terminate_pod(pod_id, reason="again")  # the launcher's last word after the watchdog's
    assert pods.ledger.get(pod_id)["end_reason"] == "done"


# -- what the real API does (issue 18) -------------------------------------------------


@pytest.mark.parametrize("fault", ["graphql-500", "after-graphql-500", "drop", "after-drop"])
def test_a_create_answered_with_a_server_error_or_no_answer_is_retried_and_never_duplicated(tmp_path, fake, fault):
    """A 500 whose body is a GraphQL error ("internal error") reads to the SDK like any
    refused request; a dropped connection leaves no answer at all. Both are retried, and
    a create the server carried out is found by its name."""
    pods = orchestrator(tmp_path, fake)
    fake.failures = [None, None, fault]  # our price lookup, the SDK's gpuTypes check, then the create
    pod_id = pods.start_pod()
    assert list(fake.pods) == [pod_id] and fake.failures == []
    assert pods.ledger.get(pod_id)["pod_id"] == pod_id
    pods.terminate_pod(pod_id)


def test_a_status_poll_answered_with_graphql_500s_is_retried(tmp_path, fake):
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    fake.failures = ["graphql-500", "graphql-500"]
    assert pods.get_pod_status(pod_id)["id"] == pod_id
    pods.terminate_pod(pod_id)


def test_the_ledger_is_closed_when_the_check_after_a_terminate_gets_server_errors(tmp_path, fake):
    import time

    pods = RunpodOrchestrator(PodSettings(image="x", **FAST), PodLedger(str(tmp_path / "out")), api_key=fake.api_key,
                              sleep=lambda _seconds: time.sleep(0.4))  # each retry waits a noticeable while
    pod_id = pods.start_pod()
    fake.failures = [None, "graphql-500", "graphql-500", "graphql-500"]  # the terminate goes through; the checks fail
    pods.terminate_pod(pod_id)
    record = pods.ledger.get(pod_id)
    assert fake.pods[pod_id].terminated_at and record["end_reason"] == "done"
    # It ended with the terminate, not with the confirmation the retries waited for.
    assert record["stopped_at_epoch"] == pytest.approx(fake.pods[pod_id].terminated_at, abs=0.05)


def test_terminating_twice_asks_the_api_and_logs_once(tmp_path, fake, caplog):
    pods = orchestrator(tmp_path, fake)
    pod_id = pods.start_pod()
    pods.terminate_pod(pod_id, reason="first")
    asked = len(fake.requests)
    caplog.clear()  # the first terminate's line may be there, depending on the logger's level before
    with caplog.at_level("INFO", logger="luigi-interface"):
        pods.terminate_pod(pod_id, reason="second")
    assert len(fake.requests) == asked and "terminated pod" not in caplog.text
    assert pods.ledger.get(pod_id)["end_reason"] == "first"


def test_a_gpu_with_no_listed_price_is_recorded_at_the_pods_own_price_with_a_warning(tmp_path, fake, caplog):
    fake.unlisted_prices = {"NVIDIA GeForce RTX 4090"}
    pods = orchestrator(tmp_path, fake)
    with caplog.at_level("WARNING", logger="luigi-interface"):
        pod_id = pods.start_pod()
    assert "lists no price for NVIDIA GeForce RTX 4090" in caplog.text
    billed = fake.pods[pod_id].cost_per_hr
    assert billed > 0 and pods.ledger.get(pod_id)["price_per_hour"] == billed  # before it ever runs
    assert "LAUNCH_WATCHDOG_PRICE_PER_HOUR" not in fake.pods[pod_id].env, "the watchdog was told a price of 0"
    pods.terminate_pod(pod_id)
    assert PodLedger.dollars(pods.ledger.get(pod_id)) == pytest.approx(fake.dollars(pod_id), abs=1e-4)


def test_a_pod_with_no_price_anywhere_is_ended_not_run_unbudgeted(tmp_path, fake, monkeypatch, capsys):
    fake.unlisted_prices = {"NVIDIA GeForce RTX 4090"}
    monkeypatch.setitem(GPU_TYPES["NVIDIA GeForce RTX 4090"], "communityPrice", 0.0)  # and the pod shows none
    pods = orchestrator(tmp_path, fake)
    with pytest.raises(PodError, match="has no price"):
        pods.start_pod()
    [pod_id] = fake.pods
    assert fake.pods[pod_id].terminated_at and pods.ledger.get(pod_id)["end_reason"] == "no price known"
    assert cost_report(str(tmp_path / "out"))["price_unknown"] == [pod_id]  # billed: never a $0 that looks true
    from pipeline.cli import main

    main(["cost", str(tmp_path / "out")])
    assert f"({pod_id}) were billed at a price the API never told" in capsys.readouterr().out


def test_capacity_is_looked_for_until_the_deadline_and_the_message_says_how_long(tmp_path, fake):
    for gpu in fake.capacity:
        fake.capacity[gpu] = 0
    now = [1000.0]
    pods = RunpodOrchestrator(PodSettings(image="x", **{**FAST, "capacity_timeout": 30, "capacity_retry_wait": 4}),
                              PodLedger(str(tmp_path / "out")), api_key=fake.api_key,
                              clock=lambda: now[0], sleep=lambda seconds: now.__setitem__(0, now[0] + seconds))
    with pytest.raises(NoCapacity, match=r"in 30s of looking \(--capacity-seconds 30\)"):
        pods.start_pod()
    assert now[0] == 1030.0  # rounds at 0, 4, 12, 28 and a last one at the deadline


def test_the_limits_are_asked_every_poll_while_a_free_gpu_is_looked_for(tmp_path, fake):
    """Rounds of the search wait up to 5 minutes: the run's other pods, running and billed,
    were unchecked that long (2.1x the budget was seen). The limits are asked every poll,
    and the first reason stops the search."""
    for gpu in fake.capacity:
        fake.capacity[gpu] = 0
    now, asked = [1000.0], []
    pods = RunpodOrchestrator(PodSettings(image="x", **{**FAST, "capacity_timeout": 600, "capacity_retry_wait": 120,
                                                        "poll_interval": 10}),
                              PodLedger(str(tmp_path / "out")), api_key=fake.api_key,
                              clock=lambda: now[0], sleep=lambda seconds: now.__setitem__(0, now[0] + seconds))

    def limit():
        asked.append(now[0])
        return "spend limit: the other pods would pass it" if now[0] >= 1045 else None

    with pytest.raises(PodLimit, match="spend limit: the other pods would pass it: stopped looking for a free GPU"):
        pods.start_pod(limit=limit)
    assert now[0] == 1050.0 and max(b - a for a, b in zip(asked, asked[1:])) <= 10
    assert not fake.pods


def test_a_limit_during_provisioning_ends_the_pod(tmp_path, fake):
    fake.stuck_provisioning = True
    pods = orchestrator(tmp_path, fake, provisioning_timeout=60)
    pod_id = pods.start_pod()
    with pytest.raises(PodLimit, match="spend limit"):
        pods.wait_until_running(pod_id, limit=lambda: "spend limit: test")
    assert pods.ledger.get(pod_id)["end_reason"] == "launcher: spend limit: test"
