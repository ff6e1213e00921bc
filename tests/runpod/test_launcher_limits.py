"""The launcher's own limits, on a clock the test moves."""

from pipeline.runpod.launcher_limits import RunGuard, RunLimits


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def guard(**limits):
    clock = Clock()
    return RunGuard(RunLimits(**{"max_dollars": 1.0, "first_shard_seconds": 60, "idle_seconds": 30, "max_seconds": 3600,
                                 "poll_seconds": 36, **limits}), clock=clock), clock


def test_spend_is_judged_one_look_ahead():
    g, _ = guard(max_dollars=1.0, poll_seconds=36)  # at $10/h one look is $0.10
    assert g.breach(spent=0.89, dollars_per_hour=10) is None
    reason = g.breach(spent=0.90, dollars_per_hour=10)
    assert reason.startswith("spend limit: $0.9000 spent of --max-dollars 1")


def test_a_look_stretched_by_retries_stretches_the_look_ahead():
    """With a third of API calls failing, a look took longer than the poll interval and
    the run went 11-17 % over budget: the longest look seen is the one judged ahead."""
    g, clock = guard(max_dollars=1.0, poll_seconds=36)  # at $10/h: $0.10 a poll, $0.30 a 108 s look
    assert g.breach(spent=0.50, dollars_per_hour=10) is None
    clock.now += 108  # the look took three polls: retries with backoff
    assert g.breach(spent=0.69, dollars_per_hour=10) is None
    clock.now += 36
    assert g.breach(spent=0.71, dollars_per_hour=10).startswith("spend limit")  # 0.71 + 0.30 passes 1.00


def test_no_deadline_before_a_pod_runs():
    g, clock = guard()
    g.saw_shards(0)
    clock.now += 10_000
    assert g.deadline_in() is None and g.breach(0, 0) is None


def test_the_first_shard_is_due_within_its_deadline_of_the_pod_running():
    g, clock = guard(first_shard_seconds=60, idle_seconds=30)
    g.saw_shards(0)
    g.pod_running()
    clock.now += 59
    g.saw_shards(0)
    assert g.breach(0, 0) is None and g.deadline_in()[0] == "first shard"
    clock.now += 2
    assert g.breach(0, 0) == "no shard within 60s of the pod running (--first-shard-seconds)"


def test_after_a_shard_the_idle_deadline_counts_from_it():
    g, clock = guard(first_shard_seconds=60, idle_seconds=30)
    g.saw_shards(3)  # shards made before this launch do not count as progress
    g.pod_running()
    clock.now += 50
    g.saw_shards(4)
    clock.now += 29
    assert g.breach(0, 0) is None and g.deadline_in() == ("next shard", 1)
    clock.now += 2
    assert g.breach(0, 0) == "no new shard for 30s (--idle-seconds)"


def test_a_new_pod_running_starts_a_first_shard_deadline_again():
    g, clock = guard(first_shard_seconds=60, idle_seconds=30)
    g.saw_shards(0)
    g.pod_running()
    clock.now += 10
    g.saw_shards(1)
    clock.now += 20
    g.pod_running()  # a spot pod's replacement: it loads its model first
    clock.now += 45
    assert g.breach(0, 0) is None


def test_runtime_counts_from_the_oldest_pods_creation():
    g, clock = guard(max_seconds=100)
    assert g.breach(0, 0, oldest_created=clock.now - 99) is None
    assert g.breach(0, 0, oldest_created=clock.now - 101).startswith("runtime limit")


def test_shard_deadlines_wait_while_no_pod_is_running():
    """A spot pod's replacement being looked for or starting: no pod can make shards."""
    g, clock = guard(first_shard_seconds=60, idle_seconds=30)
    g.saw_shards(0)
    g.pod_running()
    clock.now += 100
    assert g.breach(0, 0, shard_deadlines=False) is None
    assert g.breach(0.99, 10, shard_deadlines=False).startswith("spend limit")  # spend counts all the same


def test_of_several_pods_the_one_that_makes_no_shard_is_named_and_the_others_kept():
    g, clock = guard(first_shard_seconds=60, idle_seconds=50)
    g.saw_shards(0)
    g.pod_running("a")
    g.pod_running("b")
    clock.now += 20
    g.saw_shards(1)
    g.saw_pod_shards(["a"])
    clock.now += 45  # b: 65 s without a shard of its own; a: 45 s since its last
    assert g.breach(0, 0) is None  # the run makes shards
    assert g.stalled(["a", "b"]) == [("b", "pod b made no shard within 60s of running (--first-shard-seconds)")]
    assert g.stalled(["a"]) == []  # one pod alone is the run
