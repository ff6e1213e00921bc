"""What a user sees in the Luigi web view during a run, checked in a real browser.

Headless Chromium (driven by Selenium) loads the visualiser of a luigid on loopback
while a worker embeds a corpus, and finds on the page, as a user would by clicking the
task list's buttons: a RUNNING EmbedShard's status message (documents done/total,
tokens/s, ETA) with its progress percentage; EmbedAll's shards done/total, overall ETA
and dollars spent; and, for a shard made to fail, the error text its ``on_failure``
returned, and EmbedAll's figures naming it once the run is over. Screenshots of each go to ``$PIPELINE_TEST_ARTIFACTS`` (default
``test-artifacts/`` in the repository).

Skipped, saying why, where Debian's chromium and chromium-driver (or selenium) are
missing; .ci/run installs them."""

import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ROOT, luigi_command, luigi_env, running_luigid, write_corpus

pytestmark = pytest.mark.slow

SHARDS = 3
DOCS_PER_SHARD = 20
WORDS = 150  # one chunk a document
# Small batches, each followed by a pause (tests/slow_shards): a shard runs for about ten
# seconds, so the browser finds one running, while the cores stay nearly idle (the model
# embedding 150 documents of 1,200 words for the same effect cost two minutes of CPU).
BATCH_TOKENS = 512
BATCH_PAUSE_SECONDS = 0.3
FAILING = 1  # this shard's rejects file cannot be written: a folder is in its place

DURATION = r"\d+h\d\dm|\d+m\d\ds"  # pipeline.core.progress.format_duration
# Documents count as their chunks are embedded, so a running shard shows some done and an ETA.
RUNNING_SHARD = re.compile(
    rf"shard \d+ of {SHARDS}: ([1-9]\d*)/({DOCS_PER_SHARD}) documents, ETA ({DURATION})\n"
    rf"[\d,]+ tokens/s, [\d.]+ docs/s, [\d.]+ chunks/s, [\d,]+ chunks"
)
# The wrapper's figures once a shard is done, so that the run's ETA is a real one.
WHOLE_RUN = re.compile(rf"([1-9]\d*)/({SHARDS}) shards done, [\d.]+ shards/h, [\d,]+ tokens/s, ETA ({DURATION}), \$\d+\.\d\d spent")
FAILED_RUN = re.compile(rf"(\d+)/({SHARDS}) shards done, .*; failed: shard {FAILING}$")


@pytest.fixture
def artifacts(artifacts_folder) -> Path:
    """The screenshot folder, cleared of this test's old ones."""
    for old in artifacts_folder.glob("web-view-*.png"):
        old.unlink()
    return artifacts_folder


def show_task_list(driver, port: int) -> None:
    """Load the visualiser afresh (it never refreshes its task list by itself) and wait
    until its task table is drawn (the family sidebar is rendered right after)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")  # a new load, even where only the #fragment would differ
    driver.get(f"http://127.0.0.1:{port}/static/visualiser/index.html#tab=tasks")
    WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#familySidebar .sidebar-menu"))


def task_rows(driver, family: str, statuses: tuple[str, ...]) -> list:
    """The task table's rows of ``family`` whose status column reads one of ``statuses``."""
    from selenium.webdriver.common.by import By

    found = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#taskTable tbody tr"):
        cells = row.find_elements(By.TAG_NAME, "td")
        if len(cells) == 6 and cells[0].text.strip() in statuses and cells[1].text.strip() == family:
            found.append(row)
    return found


def shard_of(row) -> int:
    """The ``shard`` parameter shown in a row's details column."""
    from selenium.webdriver.common.by import By

    return int(re.search(r"\bshard=(\d+)", row.find_elements(By.TAG_NAME, "td")[2].text).group(1))


def open_modal(driver, row, button: str, modal: str):
    """Click a row's action button (``button.statusMessage``: the speech bubble;
    ``button.showError``: the bug) and return the modal it opens, once shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    row.find_element(By.CSS_SELECTOR, button).click()
    return WebDriverWait(driver, 10).until(expected_conditions.visibility_of_element_located((By.ID, modal)))


def read_status_modal(driver, pattern: re.Pattern, timeout: float):
    """Wait for the status message modal (it asks luigid every 0.5 s) to show a message
    matching ``pattern`` and the progress percentage that goes with it, done/total
    (groups 1 and 2); returns (title, message, percentage) as shown, or None."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        modal = d.find_element(By.ID, "statusMessageModal")
        message = modal.find_element(By.CSS_SELECTOR, ".modal-body pre").text
        percentage = modal.find_element(By.CSS_SELECTOR, ".progress-bar").text.strip()
        match = pattern.search(message)
        if match and percentage == f"{100 * int(match.group(1)) // int(match.group(2))}%":
            return modal.find_element(By.CSS_SELECTOR, ".modal-title").text, message, percentage
        return None

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(shown)
    except TimeoutException:
        return None


def test_the_web_view_shows_running_shards_the_runs_progress_and_a_failed_shards_error(tmp_path, browser, artifacts):
    from selenium.webdriver.common.by import By

    corpus = write_corpus(tmp_path / "corpus", documents=SHARDS * DOCS_PER_SHARD, words=WORDS)
    output = tmp_path / "out"
    (output / "rejects" / f"shard-{FAILING:06d}.jsonl").mkdir(parents=True)  # as in test_many_workers
    log = tmp_path / "worker.log"
    with running_luigid(tmp_path / "luigid") as port, log.open("w") as log_file:
        worker = subprocess.Popen(
            luigi_command("EmbedAll", "--corpus", str(corpus), "--output", str(output),
                          "--docs-per-shard", str(DOCS_PER_SHARD), "--device", "cpu", "--batch-tokens", str(BATCH_TOKENS),
                          "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)),
            cwd=ROOT, env=luigi_env(HOME=str(tmp_path), PYTHONPATH=str(ROOT / "tests" / "slow_shards"),
                                    TEST_BATCH_PAUSE_SECONDS=str(BATCH_PAUSE_SECONDS)),
            stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            started = time.monotonic()
            deadline = started + 300  # under a minute on two idle cores; the rest is for busy machines

            def still_worth_waiting(what: str) -> None:
                assert worker.poll() is None, f"the worker ended (exit {worker.returncode}) before {what}"
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.5)

            # A running shard: its speech bubble opens its status message and progress bar.
            while True:
                show_task_list(browser, port)
                rows = [row for row in task_rows(browser, "EmbedShard", ("RUNNING",))
                        if row.find_elements(By.CSS_SELECTOR, "button.statusMessage")]
                if rows:
                    open_modal(browser, rows[0], "button.statusMessage", "statusMessageModal")
                    shown = read_status_modal(browser, RUNNING_SHARD, timeout=5)
                    if shown:
                        break
                still_worth_waiting("a running EmbedShard with its status message")
            title, message, percentage = shown
            assert title.startswith("Status message for EmbedShard(") and "shard=" in title, title
            browser.save_screenshot(str(artifacts / "web-view-running-shard.png"))
            print(f"{time.monotonic() - started:.0f}s: {title.split('(')[0]}: {message} [{percentage}]")

            # The wrapper, pending while its shards run: the whole run's figures, live in
            # its open modal until a shard is done and the ETA is a real one.
            while True:
                show_task_list(browser, port)
                rows = [row for row in task_rows(browser, "EmbedAll", ("PENDING", "UPSTREAM_FAILED"))
                        if row.find_elements(By.CSS_SELECTOR, "button.statusMessage")]
                if rows:
                    open_modal(browser, rows[0], "button.statusMessage", "statusMessageModal")
                    shown = read_status_modal(browser, WHOLE_RUN, timeout=max(0.0, deadline - time.monotonic()))
                    if shown:
                        break
                still_worth_waiting("EmbedAll with shards done, ETA and dollars spent")
            title, message, percentage = shown
            assert title.startswith("Status message for EmbedAll("), title
            browser.save_screenshot(str(artifacts / "web-view-run-progress.png"))
            print(f"{time.monotonic() - started:.0f}s: {title.split('(')[0]}: {message} [{percentage}]")

            # The failed shard: its bug button opens the error text from on_failure.
            while True:
                show_task_list(browser, port)
                rows = [row for row in task_rows(browser, "EmbedShard", ("FAILED",)) if shard_of(row) == FAILING]
                if rows:
                    break
                still_worth_waiting(f"EmbedShard {FAILING} to fail")
            browser.save_screenshot(str(artifacts / "web-view-task-list.png"))
            modal = open_modal(browser, rows[0], "button.showError", "errorModal")
            title = modal.find_element(By.CSS_SELECTOR, ".modal-title").text
            error = modal.find_element(By.CSS_SELECTOR, ".modal-body pre").text
            assert title.startswith("Traceback for EmbedShard(") and f"shard={FAILING}" in title, title
            assert re.match(rf"EmbedShard( failed: \w+)?: .*rejects/shard-{FAILING:06d}\.jsonl", error), error
            browser.save_screenshot(str(artifacts / "web-view-failed-shard.png"))
            print(f"{time.monotonic() - started:.0f}s: failed: {error.splitlines()[0]}")

            assert worker.wait(timeout=max(1.0, deadline - time.monotonic())) == 30  # luigi.cfg: task_failed
            print(f"{time.monotonic() - started:.0f}s: the worker ended")

            # After the run, the wrapper's figures still say which shard failed.
            show_task_list(browser, port)
            rows = [row for row in task_rows(browser, "EmbedAll", ("PENDING", "UPSTREAM_FAILED"))
                    if row.find_elements(By.CSS_SELECTOR, "button.statusMessage")]
            assert rows, "EmbedAll is not in the task list after the run"
            open_modal(browser, rows[0], "button.statusMessage", "statusMessageModal")  # listed twice at times
            shown = read_status_modal(browser, FAILED_RUN, timeout=10)
            assert shown, "EmbedAll's message does not name the failed shard"
            browser.save_screenshot(str(artifacts / "web-view-run-after-failure.png"))
            print(f"{time.monotonic() - started:.0f}s: EmbedAll: {shown[1]} [{shown[2]}]")
        except BaseException:
            try:
                browser.save_screenshot(str(artifacts / "web-view-at-failure.png"))
            finally:
                print(f"worker log (tail):\n{log.read_text()[-3000:]}")  # shown with the failure
            raise
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
