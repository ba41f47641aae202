"""The web interface end to end in a real headless browser (Debian's chromium, driven by Playwright).

``orchester web`` runs as its own process against a real local cluster; the browser opens the
printed link, uploads a model, presses Fit, watches the live chart grow, downloads the CSV and
compares it with what ``orchester fit`` writes for the same model and settings. Screenshots of
each page are kept in the test's folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_HB, TEST_ENV, stop_processes

from orchester import LocalCluster
from serializers.messages import JobsReport

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "genx"
#: Enough generations that the fit runs for a while: the chart is seen growing before it ends.
GENERATIONS = 1500


@pytest.fixture(scope="module")
def web_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(satellites=1, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      liveness=3, env=TEST_ENV, log_level="WARNING") as c:
        yield c


@pytest.fixture
def web(web_cluster: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """``orchester web`` on the cluster, a process of its own; the link it prints (with the token)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchester", "web", "--connect", web_cluster.endpoint, "--bind", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "web")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **TEST_ENV})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        m = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([0-9a-f]+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield m.group(0)
    finally:
        stop_processes([proc])  # type: ignore[list-item]
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_upload_fit_watch_download(web: str, web_cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    base = web.split("?")[0]
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        # the link: the token becomes a cookie and leaves the address bar
        page.goto(web)
        assert page.url == base
        page.wait_for_selector("#satellites tbody tr >> text=local-0", timeout=30_000)
        page.wait_for_selector("#live.on", timeout=30_000)
        page.wait_for_function("Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('fleet')"
                               ".data.t.length > 1", timeout=30_000)
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

        # upload a model, press Fit
        page.click("text=Fits")
        page.set_input_files("#model", str(EXAMPLES / "nickel_film.hgx"))
        page.wait_for_selector("#defaults >> text=stored settings", timeout=60_000)  # read from the file
        assert page.get_attribute("input[name=population]", "placeholder").isdigit()
        page.fill("input[name=generations]", str(GENERATIONS))
        page.fill("input[name=population]", "12")
        page.fill("input[name=seed]", "7")
        page.click("#fit-button")
        page.wait_for_selector("#fits tbody tr >> text=nickel_film", timeout=60_000)
        page.screenshot(path=str(tmp_path / "fits.png"), full_page=True)
        # the list refreshes every second; the link stays the same element, so no click is lost to a refresh
        page.evaluate("window.shownLink = document.querySelector('#fits tbody a')")
        for _ in range(2):
            page.wait_for_event("response", lambda r: r.url.endswith("/api/series"), timeout=30_000)
        assert page.evaluate("document.querySelector('#fits tbody a') === window.shownLink")
        page.click("#fits tbody tr >> text=nickel_film")
        page.wait_for_url(re.compile(r".*/fits/[0-9a-f]{32}$"))

        # the live chart grows while the fit runs, then the result shows
        points = "Bokeh.documents[0].get_model_by_name('fom').data.generation.length"
        page.wait_for_function(f"Bokeh.documents.length > 0 && {points} > 0", timeout=120_000)
        seen = []  # the chart's points, sampled while the fit runs
        deadline = time.monotonic() + 240
        while page.inner_text("#fit-state") != "done" and time.monotonic() < deadline:
            seen.append(page.evaluate(points))
            time.sleep(0.1)
        assert page.inner_text("#fit-state") == "done"
        growing = sorted({n for n in seen if 0 < n < GENERATIONS})
        assert len(growing) >= 2, seen  # seen part-way, more than once: it grew while the fit ran
        assert page.evaluate(points) >= GENERATIONS - 1
        page.wait_for_selector("#files a >> text=nickel_film.csv", timeout=30_000)
        page.wait_for_selector("#parameters tbody tr", timeout=30_000)
        page.wait_for_function("Bokeh.documents.length >= 2", timeout=30_000)  # the data-and-fit figure
        page.screenshot(path=str(tmp_path / "fit.png"), full_page=True)

        with page.expect_download() as download:
            page.click("#files a >> text=nickel_film.csv")
        got = Path(download.value.path()).read_bytes()

        # the tasks page lists the fit's task; its page shows the timeline
        page.click("text=Tasks")
        page.wait_for_selector("#tasks tbody tr >> text=genx.fit", timeout=30_000)
        page.screenshot(path=str(tmp_path / "tasks.png"), full_page=True)
        page.click("#tasks tbody tr:has-text('genx.fit') a")
        page.wait_for_selector("#timeline tbody tr >> text=done", timeout=30_000)
        page.screenshot(path=str(tmp_path / "task.png"), full_page=True)

        # the history page: the day's roll-ups (this cluster keeps no journal: it says so, clearly)
        page.click("text=History")
        page.wait_for_selector("#history-error:not([hidden])", timeout=30_000)
        assert "journal" in page.inner_text("#history-error")
    finally:
        context.close()
    assert not problems, problems

    # the same model and settings through orchester fit
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "orchester", "fit", "--connect", web_cluster.endpoint,
                          "--generations", str(GENERATIONS), "--population", "12", "--seed", "7", "--no-cache",
                          "--out", str(out), str(EXAMPLES / "nickel_film.hgx")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **TEST_ENV})
    assert run.returncode == 0, run.stderr[-2000:]
    assert got == (out / "nickel_film.csv").read_bytes()
    for name in ("overview", "fits", "fit", "tasks", "task"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_a_series_from_the_page(web: str, browser: Any, tmp_path: Path) -> None:
    """One model and four data files, chained: the series' page fills its table and figure as fits end."""
    series = sorted((EXAMPLES / "series").glob("*.dat"))[:4]
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(web)
        page.goto(web.split("?")[0] + "fits")
        page.set_input_files("#model", str(EXAMPLES / "nickel_film.hgx"))
        page.wait_for_selector("#defaults >> text=stored settings", timeout=60_000)
        page.set_input_files("#data", [str(p) for p in reversed(series)])
        assert "4 data file(s)" in page.inner_text("#data-chosen")
        page.fill("input[name=generations]", "15")
        page.fill("input[name=population]", "10")
        page.check("input[name=chain]")
        page.click("#fit-button")
        page.wait_for_url(re.compile(r".*/series/[0-9a-f]{32}$"), timeout=60_000)
        page.wait_for_selector("#rows tbody tr", timeout=60_000)
        page.wait_for_function("document.querySelector('#series-state').textContent === 'done'", timeout=300_000)
        page.wait_for_selector("#files a >> text=series.csv", timeout=30_000)
        rows = page.locator("#rows tbody tr")
        assert rows.count() == 4
        assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(4)] == [p.name for p in series]
        assert all(rows.nth(i).locator("td").nth(2).inner_text() == "done" for i in range(4))
        # every panel of the figure has a point per dataset
        panels = page.evaluate("Bokeh.documents[0].all_models.size && Array.from(Bokeh.documents[0].all_models)"
                               ".filter((m) => (m.name || '').startsWith('series-')).map((m) => m.data.value.length)")
        assert panels and all(n == 4 for n in panels), panels
        page.screenshot(path=str(tmp_path / "series.png"), full_page=True)
        with page.expect_download() as download:
            page.click("#files a >> text=series.csv")
        table = Path(download.value.path()).read_text().splitlines()
        assert len(table) == 5 and table[0].startswith("file,sequence,status,fom")
        page.click("text=Fits")
        page.wait_for_selector("#series-list tbody tr >> text=nickel_film", timeout=30_000)
    finally:
        context.close()
    assert not problems, problems
    assert (tmp_path / "series.png").stat().st_size > 10_000


def test_a_tasks_page_draws_its_neighbourhood(web: str, web_cluster: LocalCluster, browser: Any,
                                              tmp_path: Path) -> None:
    """A fan-in's page draws what it waited for, itself and what waits for it; each box links to its task."""
    with web_cluster.client() as client:
        parts = [client.submit("t.inc", i) for i in range(3)]
        bad = client.submit("fail", "on purpose")
        total = client.submit("t.sum", parts)
        after = client.submit("t.inc", total)
        cleanup = client.submit("echo", "tidy", after=[total, bad], on_failure="run")
        assert after.result(timeout=60) == 7 and cleanup.result(timeout=60) == "tidy"
    base = web.split("?")[0]
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(web)
        page.goto(f"{base}tasks/{total.task_id}")
        page.wait_for_selector("#graph svg", timeout=30_000)
        assert page.locator("#graph svg rect").count() == 3 + 1 + 2  # its three inputs, itself, two dependents
        assert page.locator("#graph svg rect.current").count() == 1
        assert page.locator("#graph svg path.edge").count() == 5
        labels = page.locator("#graph svg text").all_text_contents()
        assert any(parts[0].task_id[:8] in t and "done" in t for t in labels), labels
        assert "waits for 3 task(s)" in page.inner_text("#neighbourhood-note")
        page.screenshot(path=str(tmp_path / "neighbourhood.png"), full_page=True)
        page.click(f"#graph svg a[href$='{cleanup.task_id}']")
        page.wait_for_url(re.compile(f".*/tasks/{cleanup.task_id}$"))
        page.wait_for_selector("#graph svg", timeout=30_000)
        assert "runs even if one fails" in page.inner_text("#neighbourhood-note")
        assert page.locator("#graph svg rect.s-failed").count() == 1
        page.goto(f"{base}tasks/{parts[0].task_id}")  # no dependency, one dependent
        page.wait_for_selector("#graph svg", timeout=30_000)
        assert page.locator("#graph svg rect").count() == 2
    finally:
        context.close()
    assert not problems, problems
    assert (tmp_path / "neighbourhood.png").stat().st_size > 5_000


def test_a_page_without_the_token_says_how_to_get_in(web: str, browser: Any) -> None:
    page = browser.new_page()
    try:
        response = page.goto(web.split("?")[0] + "fits")
        assert response is not None and response.status == 403
        assert "link printed" in page.inner_text("body")
    finally:
        page.close()


def test_a_non_genx_upload_shows_a_clear_error(web: str, browser: Any, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.hgx"
    bogus.write_text("these are my notes, not a model")
    page = browser.new_page()
    try:
        page.goto(web)
        page.goto(web.split("?")[0] + "fits")
        page.set_input_files("#model", str(bogus))
        page.click("#fit-button")
        page.wait_for_selector("#fit-error:not([hidden])", timeout=60_000)
        text = page.inner_text("#fit-error")
        assert "notes.hgx" in text and "not" in text and "GenX" in text
        time.sleep(1.5)
        assert page.locator("#fits tbody tr").count() == 0
    finally:
        page.close()


def _start_web(endpoint: str, data: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "orchester", "web", "--connect", endpoint, "--bind", "127.0.0.1:0",
                             "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **TEST_ENV})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "token=" in line, line
    return proc, line.split()[-1]


def _api(link: str, path: str, body: bytes | None = None, ctype: str = "") -> Any:
    import json
    import urllib.request

    base, token = link.split("?token=")
    headers = {"Authorization": f"token {token}", **({"Content-Type": ctype} if ctype else {})}
    with urllib.request.urlopen(urllib.request.Request(base + path.lstrip("/"), data=body, headers=headers),
                                timeout=60) as r:
        return json.loads(r.read())


def test_killing_the_web_process_costs_the_bus_nothing(web_cluster: LocalCluster, tmp_path: Path) -> None:
    import signal

    boundary = "b0undary"
    model = (EXAMPLES / "iron_film.hgx").read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"generations\"\r\n\r\n3000\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"population\"\r\n\r\n12\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"iron_film.hgx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + model + f"\r\n--{boundary}--\r\n".encode()
    with web_cluster.client() as c:
        bad_before = c.status()["counters"].get("bad_messages", 0)
    proc, link = _start_web(web_cluster.endpoint, tmp_path / "web")
    try:
        fid = _api(link, "/api/fits", body, f"multipart/form-data; boundary={boundary}")["fits"][0]["id"]
        deadline = time.monotonic() + 60
        while _api(link, f"/api/fits/{fid}")["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # mid-fit, no goodbye
        proc.wait(10)
    finally:
        stop_processes([proc])  # type: ignore[list-item]
    with web_cluster.client() as c:  # the bus runs the fit to its end all the same
        assert c.result(fid, timeout=240)["generations"] == 3000
        assert c.status()["counters"].get("bad_messages", 0) == bad_before
    proc, link = _start_web(web_cluster.endpoint, tmp_path / "web")  # the same folder: the fit is read back
    try:
        deadline = time.monotonic() + 120
        while (fit := _api(link, f"/api/fits/{fid}"))["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fit["state"] == "done" and "iron_film.csv" in fit["files"]
    finally:
        stop_processes([proc])  # type: ignore[list-item]


def test_the_overview_shows_the_autoscalers_jobs_and_their_satellites(web: str, web_cluster: LocalCluster,
                                                                      browser: Any, tmp_path: Path) -> None:
    """A satellite started in a batch job names it; an autoscaler's report lists its jobs by state."""
    sat = subprocess.Popen([sys.executable, "-m", "satellites", "run", "--connect", web_cluster.endpoint,
                            "--workers", "1", "--id", "node7-sat", "--job", "4242", "--heartbeat-interval",
                            str(FAST_HB)], env={**os.environ, **TEST_ENV})
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        with web_cluster.client() as client:
            deadline = time.monotonic() + 60
            while not any(s["id"] == "node7-sat" for s in client.status()["satellites"]):
                assert time.monotonic() < deadline and sat.poll() is None
                time.sleep(0.2)
            page.goto(web)
            page.wait_for_selector("#satellites tbody tr >> text=node7-sat", timeout=30_000)
            assert page.is_hidden("#batch")  # no autoscaler yet: no section
            client.report_jobs(JobsReport("lab", "slurm", (("4242", "running", 310.0), ("4243", "pending", 4.0)),
                                          max_jobs=4, error="sbatch failed (exit 1): QOSMaxSubmitJobPerUserLimit"))
            page.wait_for_selector("#jobs tbody tr >> text=4243", timeout=30_000)
        rows = [r.split("\t") for r in page.locator("#jobs tbody tr").all_inner_texts()]
        assert rows[0][:3] == ["lab", "4242", "running"] and rows[0][4] == "node7-sat", rows
        assert rows[1][:3] == ["lab", "4243", "pending"] and rows[1][4] == "", rows
        assert "1 pending · 1 running · 0 ending" in page.inner_text("#batch-summary")
        assert "QOSMaxSubmitJobPerUserLimit" in page.inner_text("#batch-error")
        sat_row = page.locator("#satellites tbody tr", has_text="node7-sat").inner_text().split("\t")
        assert "4242" in sat_row
        page.screenshot(path=str(tmp_path / "jobs.png"), full_page=True)
    finally:
        context.close()
        stop_processes([sat])
    assert not problems, problems


def test_the_overview_sums_up_a_fleet_larger_than_its_list(web: str, web_cluster: LocalCluster, browser: Any,
                                                           tmp_path: Path) -> None:
    """Past the 100 satellites a status lists, the overview shows the whole fleet per state, host and kind."""
    from conftest import SimulatedFleet

    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        with SimulatedFleet(web_cluster.endpoint, 120), web_cluster.client() as client:
            deadline = time.monotonic() + 60
            while client.status(satellites=0)["fleet"]["satellites"] < 121:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            page.goto(web)
            page.wait_for_selector("#fleet-listed >> text=100 of 121 satellites", timeout=30_000)
            assert page.inner_text("#c-sats") == "121"
            assert len(page.locator("#satellites tbody tr").all()) == 100
            hosts = [r.split("\t") for r in page.locator("#fleet-hosts tbody tr").all_inner_texts()]
            assert len(hosts) == 8 and sum(int(n) for _, n in hosts) == 121, hosts
            kinds = dict(r.split("\t")[:2] for r in page.locator("#fleet-kinds tbody tr").all_inner_texts())
            assert kinds["sim.none"] == "120" and kinds["echo"] == "1", kinds
            page.screenshot(path=str(tmp_path / "fleet.png"), full_page=False)
        page.wait_for_selector("#fleet", state="hidden", timeout=30_000)  # they left: every satellite listed
    finally:
        context.close()
    assert not problems, problems


def test_the_latency_axis_labels_a_few_round_numbers_whatever_its_span(browser: Any) -> None:
    """The overview's latency axis (log) takes its ticks from ``plots.LOG_TICKS``, run here by the browser: 1, 2
    and 5 of each decade when at most six fall in view, else the decades, else a few round numbers."""
    from orchester.web.plots import LOG_TICKS, overview_figures

    page = browser.new_page()
    try:
        ticks = page.evaluate(f"(spans) => spans.map(([start, end]) => (function (cb_data) {{ {LOG_TICKS} }})"
                              "({start, end}))", [[150, 7200], [0.1, 10], [1, 1e6], [221, 318], [5, 5]])
    finally:
        page.close()
    assert ticks[0] == [200, 500, 1000, 2000, 5000]  # (bokeh's own: every one of 1000 to 7000, run together)
    assert ticks[1] == [0.1, 1, 10]  # (1, 2, 5 of three decades: seven, too many)
    assert ticks[2] == [1, 100, 10000, 1000000]  # (seven decades: every second one)
    assert ticks[3] == [240, 260, 280, 300]  # less than a 1-2-5 step: round numbers
    assert ticks[4] == [5]
    # the overview's figure uses it; counts and rates start at 0 (an idle bus: 0 to 1, never -1 to 1)
    text = str(overview_figures())
    assert "CustomJSTicker" in text and "AdaptiveTicker" in text
