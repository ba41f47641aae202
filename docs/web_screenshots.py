"""Take the web chapter's screenshots (docs/_static/web-*.png) from a real local cluster.

A local cluster with a journal and its web process run a few minutes of work (bursts of
``echo`` and ``sleep`` tasks, a few failures, two GenX fits and a chained series of ten datasets
uploaded through the API), then headless Chromium (Debian's, driven by Playwright) takes one
picture of each page.

Run: ``python docs/web_screenshots.py [--minutes 4] [--out docs/_static]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples" / "genx"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def api(link: str, path: str, body: bytes | None = None, ctype: str = "") -> object:
    base, token = link.split("?token=")
    headers = {"Authorization": f"token {token}", **({"Content-Type": ctype} if ctype else {})}
    with urllib.request.urlopen(urllib.request.Request(base + path.lstrip("/"), data=body, headers=headers),
                                timeout=60) as r:
        return json.loads(r.read())


def upload(link: str, model: Path, generations: int) -> str:
    boundary = "docs-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"generations\"\r\n\r\n{generations}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"{model.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + model.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    reply = api(link, "/api/fits", body, f"multipart/form-data; boundary={boundary}")
    assert isinstance(reply, dict)
    return str(reply["fits"][0]["id"])


def upload_series(link: str, model: Path, data: list[Path], generations: int) -> str:
    """A chained series of ``model`` over the ``data`` files; its id."""
    boundary = "docs-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (("generations", generations), ("chain", "yes"))]
    for field, path in [("model", model), *(("data", d) for d in data)]:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    reply = api(link, "/api/series", body, f"multipart/form-data; boundary={boundary}")
    assert isinstance(reply, dict)
    return str(reply["id"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="minutes of work before the pictures")
    ap.add_argument("--out", default=str(HERE / "_static"), help="folder of the PNG files")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from orchester import LocalCluster

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="orchester-docs-"))
    rng = random.Random(7)
    with LocalCluster(satellites=2, workers=2, tags=["blue"], serve_args=["--journal", str(work / "journal")],
                      web=True, web_data_dir=str(work / "web")) as cluster, cluster.client() as client:
        link = cluster.web_url
        fits = [upload(link, EXAMPLES / "nickel_film.hgx", 2500), upload(link, EXAMPLES / "platinum_film.hgx", 2500)]
        series = upload_series(link, EXAMPLES / "nickel_film.hgx", sorted((EXAMPLES / "series").glob("*.dat")), 60)
        failed = ""
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            n = rng.randint(20, 200)
            futs = [client.submit("echo", i, tags=["blue"] if i % 3 == 0 else ()) for i in range(n)]
            futs += [client.submit("sleep", rng.uniform(0.2, 1.5)) for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.4:
                futs.append(client.submit("fail", "the input file has no column 'Q'", "KeyError"))
            for f in futs:
                try:
                    f.result(120)
                except Exception:
                    failed = f.task_id
            time.sleep(rng.uniform(2, 10))
        for fid in fits:
            client.result(fid, timeout=600)
        parts = [client.submit("echo", i) for i in range(5)]  # a small workflow: a fan-in and what follows it
        joined = client.submit("echo", parts)
        follow = [client.submit("echo", joined), client.submit("sleep", 0.2, after=[joined])]
        for f in follow:
            f.result(120)
        busy = [client.submit("sleep", rng.uniform(0.5, 3.0)) for _ in range(40)]  # work while the overview is taken
        base = link.split("?")[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(link)
            page.wait_for_selector("#satellites tbody tr")
            page.wait_for_selector("#events tbody tr")
            time.sleep(2)
            page.screenshot(path=str(out / "web-overview.png"), full_page=True)
            for f in busy:
                f.result(120)
            page.goto(base + "tasks")
            page.wait_for_selector("#tasks tbody tr")
            page.screenshot(path=str(out / "web-tasks.png"))
            page.goto(base + f"tasks/{failed}")
            page.wait_for_selector("#traceback")
            time.sleep(0.5)
            page.screenshot(path=str(out / "web-task.png"), full_page=True)
            page.goto(base + f"tasks/{joined.task_id}")
            page.wait_for_selector("#graph svg")
            time.sleep(0.5)
            page.screenshot(path=str(out / "web-neighbourhood.png"), full_page=True)
            page.goto(base + "fits")
            page.wait_for_selector("#fits tbody tr")
            page.screenshot(path=str(out / "web-fits.png"), full_page=True)
            page.goto(base + f"fits/{fits[0]}")
            page.wait_for_selector("#files a")
            time.sleep(1)
            page.screenshot(path=str(out / "web-fit.png"), full_page=True)
            while api(link, f"/api/series/{series}")["state"] != "done":  # type: ignore[index]
                time.sleep(1)
            page.goto(base + f"series/{series}")
            page.wait_for_selector("#files a")
            time.sleep(1)
            page.screenshot(path=str(out / "web-series.png"), full_page=True)
            page.goto(base + "history")
            page.wait_for_function("Bokeh.documents.length > 0 && document.querySelector('#history-info').textContent")
            since = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() - args.minutes * 60 - 120))
            page.fill("input[name=since]", since)
            page.select_option("select[name=step]", "60")
            page.click("#range button[type=submit]")
            page.wait_for_function("document.querySelector('#history-info').textContent.includes('1 min')")
            time.sleep(1)
            page.screenshot(path=str(out / "web-history.png"), full_page=True)
            browser.close()
    print("\n".join(str(p) for p in sorted(out.glob("web-*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
