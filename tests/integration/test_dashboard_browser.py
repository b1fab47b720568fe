"""The dashboard in a real browser: Debian's chromium driven through chromium-driver (Selenium).

It loads the page of a run with recorded batches (another run overlaid), checks that every chart
draws one marker per batch (the held-out accuracy chart one per evaluation), that the kl axis is
logarithmic, that hovering a point shows its value, that the page refreshes itself when a batch
is recorded, and saves a screenshot under tmp_path.
Without chromium and chromedriver the test is skipped with a reason that says how to install them
(and fails under CI, whose .ci/run installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig
from aisrl.redis_conn import free_port
from aisrl.services.diagnostics.dashboard import CHARTS
from aisrl.v1 import diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_to_pb

pytestmark = pytest.mark.slow

INSTALL_HINT = "apt-get install chromium chromium-driver"


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); skips (fails under CI) when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = f"no chromium and chromedriver on PATH: the dashboard's browser test needs them ({INSTALL_HINT})"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def diagnostics(redis_server):
    """`aisrl diagnostics` as a process (the browser blocks, so the service cannot share the test's loop)."""
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from aisrl.cli import main; main()", "diagnostics", "--redis-url", redis_server.url,
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--key-prefix", "browser"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"diagnostics did not start: {process.communicate()[0]}")
        time.sleep(0.2)
    try:
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def signals(step: int) -> dict[str, float | int | None]:
    """What a learner sends: a reward with every batch, and an evaluation every 3 steps (with the next batch)."""
    out: dict[str, float | int | None] = {"reward_mean": 0.1 + 0.05 * step}
    if step % 3 == 0 and step > 0:
        out |= {"eval_step": step - 1, "accuracy_greedy": 0.1 * step, "accuracy_sampled": 0.05 * step}
    return out


def record(target: str, run_id: str, steps: range) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        for step in steps:
            batch = synthetic_batch(n_sequences=8, mean_length=8, mismatch=0.02 * (step + 1), seed=step)
            message = batch_to_pb(batch, CorrectionConfig(), run_id=run_id, step=step, signals=signals(step))
            stub.ComputeCoefficient(message, timeout=10)


@pytest.fixture
def browser():
    chromium, chromedriver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,2200"):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _markers(driver, chart_id: str) -> list[int]:
    """Markers drawn per trace of one chart (what a reader sees, not the data behind it)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`#chart-${arguments[0]} .scatterlayer .trace`)]"
        ".map(t => t.querySelectorAll('.points path').length)",
        chart_id,
    )


def test_dashboard_renders_every_chart_hover_values_and_live_refresh(diagnostics, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, grpc_target = diagnostics
    record(grpc_target, "browser-a", range(7))
    record(grpc_target, "browser-b", range(4))
    browser.get(f"{url}/v1/runs/browser-a/dashboard?compare=browser-b")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: int(d.execute_script("return document.body.dataset.rendered || 0")) >= 1)

    for chart in CHARTS:  # run a's traces have 7 markers, run b's 4; fields without values draw no trace
        if chart.get("x") == "eval":
            continue
        counts = _markers(browser, chart["id"])
        assert counts and sorted(set(counts)) in ([4, 7], [7]), (chart["id"], counts)
    assert _markers(browser, "alpha") == [7, 7, 4, 4]  # applied and shadow alpha of each run
    assert _markers(browser, "reward") == [7, 4]
    # evaluations: run a's after steps 2 and 5 (sent with 3 and 6), run b's after step 2; greedy and sampled each
    assert _markers(browser, "accuracy") == [2, 2, 1, 1]
    assert "browser-a: sampled" in browser.find_element(By.ID, "chart-accuracy").text
    assert browser.execute_script("return document.getElementById('chart-kl')._fullLayout.yaxis.type") == "log"
    assert "browser-b: rho" in browser.find_element(By.ID, "chart-rho").text

    series = httpx.get(f"{url}/v1/runs/browser-a/series").json()
    point = browser.find_elements(By.CSS_SELECTOR, "#chart-rho .scatterlayer .trace:first-child .points path")[3]
    ActionChains(browser).move_to_element(point).perform()
    hover = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-rho .hoverlayer .hovertext"))
    shown = hover[0].text
    match = re.search(r"rho ([0-9.eE+-]+)", shown)
    assert match and float(match.group(1)) == pytest.approx(series["fields"]["reliability"][3], rel=1e-3), shown
    assert "step 3" in shown

    # the accuracy chart's points sit at the evaluation steps, and hovering one shows its value
    point = browser.find_elements(By.CSS_SELECTOR, "#chart-accuracy .scatterlayer .trace:first-child .points path")[1]
    ActionChains(browser).move_to_element(point).perform()
    hover = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-accuracy .hoverlayer .hovertext"))
    match = re.search(r"greedy ([0-9.eE+-]+)", hover[0].text)
    assert match and float(match.group(1)) == pytest.approx(0.6) and "step 5" in hover[0].text, hover[0].text

    before = int(browser.execute_script("return document.body.dataset.rendered"))
    record(grpc_target, "browser-a", range(7, 8))  # the run goes on: the open page picks the batch up
    wait.until(lambda d: int(d.execute_script("return document.body.dataset.rendered")) > before)
    wait.until(lambda d: _markers(d, "alpha")[:2] == [8, 8])
    assert "step 7" in browser.find_element(By.ID, "latest-title").text

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_index_page_links_each_run_to_its_dashboard(diagnostics, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, grpc_target = diagnostics
    record(grpc_target, "browser-index", range(2))
    browser.get(url + "/")
    link = browser.find_element(By.LINK_TEXT, "browser-index")
    link.click()
    WebDriverWait(browser, 30).until(lambda d: int(d.execute_script("return document.body.dataset.rendered || 0")))
    assert browser.current_url.endswith("/v1/runs/browser-index/dashboard")
    assert _markers(browser, "alpha") == [2, 2]


def test_saved_snapshot_opens_without_the_service(diagnostics, browser, tmp_path):
    """The file `aisrl demo --diagnostics-only` saves: data and scripts inline, opened from disk."""
    from selenium.webdriver.support.ui import WebDriverWait

    from aisrl.services.diagnostics.dashboard import render_dashboard

    url, grpc_target = diagnostics
    record(grpc_target, "browser-snapshot", range(5))
    series = httpx.get(f"{url}/v1/runs/browser-snapshot/series").json()
    page = tmp_path / "dashboard.html"
    page.write_text(render_dashboard(["browser-snapshot"], snapshot=[series]))
    assert "<script src=" not in page.read_text()
    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(lambda d: int(d.execute_script("return document.body.dataset.rendered || 0")))
    assert _markers(browser, "alpha") == [5, 5] and _markers(browser, "kl") == [5]
