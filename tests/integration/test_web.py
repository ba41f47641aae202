"""The web interface's API and websocket, with tornado's testing tools, against a real local cluster.

One cluster (an orchestrator and a satellite, real processes) serves the whole module; each test
gets its own application, hub, client and data folder on tornado's test loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.testing
import tornado.websocket
from conftest import FAST_HB, TEST_ENV

from orchester import LocalCluster
from orchester.client.aio import AsyncClient
from orchester.web.app import COOKIE, Auth, make_app
from orchester.web.fits import FitStore

# tornado's test case waits ASYNC_TEST_TIMEOUT seconds for each fetch, 5 by default: an upload of four models
# on a loaded machine took longer (a timeout here only stops a hang)
os.environ.setdefault("ASYNC_TEST_TIMEOUT", "60")
from orchester.web.hub import Hub

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "genx"
TOKEN = "t" * 32
MAX_UPLOAD = 300_000


class WebCase(tornado.testing.AsyncHTTPTestCase):
    """A web application on a real cluster; ``self.fetch_api`` sends the token."""

    cluster: LocalCluster

    @classmethod
    def setUpClass(cls) -> None:
        cls.cluster = LocalCluster(satellites=1, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                                   liveness=3, env=TEST_ENV, log_level="WARNING").start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cluster.close()

    def get_app(self) -> Any:
        self.data = Path(tempfile.mkdtemp(prefix="orchester-web-test-"))
        self.client = AsyncClient(self.cluster.endpoint, pub=self.cluster.pub_endpoint, heartbeat_interval=FAST_HB)
        self.hub = Hub(self.client, refresh=0.2)
        self.fits = FitStore(self.data / "fits", self.client)
        self.hub.listeners.append(self.fits.on_event)
        return make_app(self.hub, self.fits, Auth(TOKEN), max_upload=MAX_UPLOAD)

    def setUp(self) -> None:
        super().setUp()
        self.io_loop.run_sync(self._start, timeout=60)

    async def _start(self) -> None:
        self.hub.start()
        assert await self.hub.wait_ready(30), self.hub.status_error

    def tearDown(self) -> None:
        async def stop() -> None:
            await self.fits.close()
            await self.hub.close()

        self.io_loop.run_sync(stop, timeout=30)
        super().tearDown()
        shutil.rmtree(self.data, ignore_errors=True)

    def get_http_client(self) -> tornado.httpclient.AsyncHTTPClient:
        return tornado.httpclient.AsyncHTTPClient(force_instance=True, defaults={"request_timeout": 120})

    def fetch_api(self, path: str, **kw: Any) -> tornado.httpclient.HTTPResponse:
        headers = {"Authorization": f"token {TOKEN}", **kw.pop("headers", {})}
        return self.fetch(path, headers=headers, raise_error=False, **kw)

    def json_of(self, path: str, status: int = 200, **kw: Any) -> Any:
        r = self.fetch_api(path, **kw)
        assert r.code == status, (r.code, r.body[:500])
        return json.loads(r.body)

    def submit(self, *calls: tuple[str, tuple[Any, ...], dict[str, Any]]) -> list[Any]:
        """Run tasks through the bus (a client of this loop) and wait for them; their ids."""
        async def go() -> list[Any]:
            futs = [self.client.submit_nowait(kind, *args, **kw) for kind, args, kw in calls]
            await asyncio.gather(*futs, return_exceptions=True)
            return [f.task_id for f in futs]

        return self.io_loop.run_sync(go, timeout=120)


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[str, bytes]:
    """A multipart/form-data body: ``model`` files and plain fields."""
    boundary = "----orchester-test-boundary"
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, body in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(body + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


class TestAccess(WebCase):
    def test_every_request_needs_the_token(self) -> None:
        for path in ("/api/status", "/api/tasks", "/api/fits", "/", "/tasks", "/fits", "/nowhere"):
            r = self.fetch(path, raise_error=False)
            assert r.code == 403, path
        body = json.loads(self.fetch("/api/status", raise_error=False).body)
        assert "token" in body["error"]
        r = self.fetch("/api/status", headers={"Authorization": "token wrong"}, raise_error=False)
        assert r.code == 403

    def test_the_link_sets_a_cookie_and_drops_the_token_from_the_address(self) -> None:
        r = self.fetch(f"/tasks?token={TOKEN}", follow_redirects=False, raise_error=False)
        assert r.code == 302 and r.headers["Location"] == "/tasks"
        cookie = [c for c in r.headers.get_list("Set-Cookie") if c.startswith(COOKIE)]
        assert cookie and "HttpOnly" in cookie[0] and "SameSite=Strict" in cookie[0]
        page = self.fetch("/tasks", headers={"Cookie": cookie[0].split(";")[0]})
        assert page.code == 200 and b"<h1>Tasks</h1>" in page.body

    def test_a_browser_post_needs_the_xsrf_token_a_script_does_not(self) -> None:
        ctype, body = multipart([("a.hgx", b"not a model")])
        r = self.fetch("/api/fits", method="POST", body=body, raise_error=False,
                       headers={"Cookie": f"{COOKIE}={Auth(TOKEN).session}", "Content-Type": ctype})
        assert r.code == 403 and b"XSRF" in r.body
        r = self.fetch_api("/api/fits", method="POST", body=body, headers={"Content-Type": ctype})
        assert r.code == 400  # past the XSRF check: refused as no GenX model

    def test_errors_are_json_without_a_traceback(self) -> None:
        for path, code in (("/api/tasks?state=bogus", 400), ("/api/tasks?since=yesterday-ish", 400),
                           ("/api/tasks?limit=0", 400), ("/api/tasks?limit=nan", 400), ("/api/fits/" + "0" * 32, 404),
                           ("/api/fits/" + "0" * 32 + "/files/x.csv", 404), ("/api/figures/nope", 404)):
            body = self.json_of(path, code)
            assert body["status"] == code and body["error"] and "Traceback" not in body["error"], path


class TestStatusAndTasks(WebCase):
    def test_status_has_the_fleet_and_a_time_series(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = self.json_of("/api/status")
            if len(body["series"]) >= 2:
                break
            self.io_loop.run_sync(lambda: asyncio.sleep(0.2))
        assert [s["id"] for s in body["status"]["satellites"]] == ["local-0"]
        assert body["series"][-1]["satellites"] == 1 and body["series"][-1]["slots"] == 2
        assert body["status_error"] == ""
        self.submit(*[("echo", (i,), {}) for i in range(20)])
        latency = self.io_loop.run_sync(self.client.status)["latency"]
        assert latency["count"] >= 20 and 0 < latency["p50"] <= latency["p95"] <= latency["max"] < 60

    def test_tasks_are_filtered_on_the_server_paged_and_exported(self) -> None:
        ok = self.submit(*[("echo", (i,), {}) for i in range(12)])
        bad = self.submit(("fail", ("boom",), {}))
        rows = self.json_of("/api/tasks?limit=1000")["rows"]
        assert set(ok + bad) <= {r["id"] for r in rows}
        failed = self.json_of("/api/tasks?state=failed&limit=1000")["rows"]
        assert bad[0] in {r["id"] for r in failed} and all(r["state"] == "failed" for r in failed)
        echo = self.json_of("/api/tasks?kind=echo&limit=1000")["rows"]
        assert all(r["kind"] == "echo" for r in echo) and set(ok) <= {r["id"] for r in echo}
        page1 = self.json_of("/api/tasks?kind=echo&limit=5")
        assert len(page1["rows"]) == 5 and page1["next_until"] is not None
        page2 = self.json_of(f"/api/tasks?kind=echo&limit=5&until={page1['next_until']}")
        assert not {r["id"] for r in page1["rows"]} & {r["id"] for r in page2["rows"]}
        assert max(r["submitted"] for r in page2["rows"]) <= min(r["submitted"] for r in page1["rows"])
        future = time.time() + 3600
        assert self.json_of(f"/api/tasks?since={future}")["rows"] == []
        r = self.fetch_api("/api/tasks?state=failed&format=csv")
        assert r.code == 200 and r.headers["Content-Type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(r.body.decode())))
        assert {row["id"] for row in table} == {r["id"] for r in failed}

    def test_a_task_page_has_its_timeline_and_error(self) -> None:
        bad = self.submit(("fail", ("kaboom",), {}))[0]
        task = self.json_of(f"/api/tasks/{bad}")
        assert task["state"] == "failed"
        states = [h["state"] for h in task["history"]]
        assert states[0] == "pending" and states[-1] == "failed" and "running" in states
        assert any(h["sat"] == "local-0" for h in task["history"])
        assert task["error"]["type"] and "kaboom" in task["error"]["msg"] and "Traceback" in task["error"]["tb"]
        assert self.json_of("/api/tasks/" + "f" * 32, 404)["status"] == 404
        assert self.json_of(f"/api/tasks/{bad}/result", 404)["status"] == 404  # failed: no result
        # a task the orchestrator no longer holds (its STATUS answers unknown_task): its history row
        from orchester.errors import RemoteError
        from serializers import messages as M

        real = self.hub.client
        call = real._call

        async def forgetful(msg: Any, timeout: Any) -> Any:
            if isinstance(msg, M.Status) and msg.task:
                raise RemoteError("unknown_task", "gone")
            return await call(msg, timeout)

        real._call = forgetful  # type: ignore[method-assign]
        try:
            old = self.json_of(f"/api/tasks/{bad}")
        finally:
            del real._call
        assert old["source"] == "history" and old["state"] == "failed" and old["kind"] == "fail"
        assert [h["state"] for h in old["history"]] == states  # no journal: the orchestrator's table has them
        good = self.submit(("echo", ([1, 2.5, "three"],), {}))[0]
        r = self.fetch_api(f"/api/tasks/{good}/result")
        assert r.code == 200 and "attachment" in r.headers["Content-Disposition"]
        assert json.loads(r.body) == [1, 2.5, "three"]

    def test_the_status_names_the_tasks_each_satellite_runs(self) -> None:
        async def go() -> list[Any]:
            futs = [self.client.submit_nowait("sleep", 1.5) for _ in range(2)]
            deadline = time.monotonic() + 30
            running: list[Any] = []
            while time.monotonic() < deadline and len(running) < 2:
                await asyncio.sleep(0.1)
                st = await self.client.status()
                running = [t for s in st["satellites"] for t in s.get("running", [])]
            await asyncio.gather(*futs)
            return sorted(running) == sorted(f.task_id for f in futs)

        assert self.io_loop.run_sync(go, timeout=60)


class TestEvents(WebCase):
    def test_events_come_in_batches_at_most_ten_a_second(self) -> None:
        async def go() -> tuple[list[dict[str, Any]], float, set[str]]:
            req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{self.get_http_port()}/ws?topics=task:",
                                                 headers={"Authorization": f"token {TOKEN}"})
            ws = await tornado.websocket.websocket_connect(req)
            assert self.hub._task_followers == 1  # the hub follows task events while this socket asks
            warm = self.client.submit_nowait("echo", "warm")  # until the subscription reached the orchestrator
            await warm
            while not any(e["topic"] == f"task:{warm.task_id}" for e in json.loads(await ws.read_message())["events"]):
                await self.client.submit_nowait("echo", "warm")
            started = time.monotonic()
            futs = [self.client.submit_nowait("echo", i) for i in range(400)]
            await asyncio.gather(*futs)
            ids = {f.task_id for f in futs}
            batches: list[dict[str, Any]] = []
            seen: set[str] = set()
            dropped = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                msg = await asyncio.wait_for(ws.read_message(), 30)
                assert isinstance(msg, str)
                batch = json.loads(msg)
                batches.append(batch)
                dropped += batch["dropped"]
                seen |= {e["topic"][5:] for e in batch["events"] if e["data"].get("state") == "done"}
                if ids <= seen or dropped:
                    break
            ws.close()
            for _ in range(50):
                if not self.hub._task_followers:
                    break
                await asyncio.sleep(0.05)
            assert self.hub._task_followers == 0  # and no more once it left
            return batches, time.monotonic() - started, ids - seen if not dropped else set()

        batches, elapsed, missing = self.io_loop.run_sync(go, timeout=90)
        assert not missing
        assert all(e["topic"].startswith("task:") for b in batches for e in b["events"])
        assert len(batches) <= elapsed * 10 + 2  # batched: never a push per event
        assert sum(len(b["events"]) for b in batches) >= 400

    def test_by_default_a_browser_gets_the_quiet_events_only(self) -> None:
        async def go() -> list[str]:
            req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{self.get_http_port()}/ws",
                                                 headers={"Authorization": f"token {TOKEN}"})
            ws = await tornado.websocket.websocket_connect(req)
            assert self.hub._task_followers == 0
            await asyncio.gather(*[self.client.submit_nowait("echo", i) for i in range(50)])
            await self.client.submit_nowait("sleep", 0.3, steps=3)  # progress events
            topics: list[str] = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    msg = await asyncio.wait_for(ws.read_message(), 0.5)
                except TimeoutError:
                    continue
                assert isinstance(msg, str)
                topics += [e["topic"] for e in json.loads(msg)["events"]]
            ws.close()
            return topics

        topics = self.io_loop.run_sync(go, timeout=60)
        assert not [t for t in topics if t.startswith("task:")]

    def test_another_origin_is_refused(self) -> None:
        async def go() -> int:
            req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{self.get_http_port()}/ws",
                                                 headers={"Authorization": f"token {TOKEN}",
                                                          "Origin": "http://evil.example"})
            try:
                await tornado.websocket.websocket_connect(req)
            except tornado.httpclient.HTTPClientError as exc:
                return exc.code
            return 101

        assert self.io_loop.run_sync(go, timeout=30) == 403

    def test_a_browser_that_does_not_read_costs_a_bounded_queue(self) -> None:
        sent: list[str] = []
        sub = self.hub.subscribe(sent.append, lambda: True)  # its previous push never leaves
        self.submit(*[("echo", (i,), {}) for i in range(300)])
        self.io_loop.run_sync(lambda: asyncio.sleep(0.5))
        assert not sent and len(sub.events) <= sub.LIMIT
        self.hub.unsubscribe(sub)


class TestUploads(WebCase):
    def test_not_a_genx_model_is_refused_and_nothing_runs(self) -> None:
        before = self.json_of("/api/status")["status"]["counters"].get("submitted", 0)
        fake = b"\x89HDF\r\n\x1a\n" + b"\0" * 500
        for name, body in (("notes.txt", b"hello"), ("empty.hgx", b""), ("fake.hgx", fake)):
            ctype, data = multipart([(name, body)])
            r = self.json_of("/api/fits", 400, method="POST", body=data, headers={"Content-Type": ctype})
            assert name in r["error"] and "\n" not in r["error"]
        assert self.json_of("/api/fits")["fits"] == []
        assert self.json_of("/api/status")["status"]["counters"].get("submitted", 0) == before

    def test_a_model_shows_the_settings_stored_in_it_and_nothing_runs(self) -> None:
        before = self.json_of("/api/status")["status"]["counters"].get("submitted", 0)
        ctype, data = multipart([("iron_film.hgx", (EXAMPLES / "iron_film.hgx").read_bytes())])
        m = self.json_of("/api/models", method="POST", body=data, headers={"Content-Type": ctype})
        assert m["file"] == "iron_film.hgx" and m["dataset_count"] >= 1 and m["fit_parameter_count"] >= 1
        assert set(m["defaults"]) == {"generations", "population", "km", "kr", "method"}
        ctype, data = multipart([("notes.txt", b"hello")])
        assert "notes.txt" in self.json_of("/api/models", 400, method="POST", body=data,
                                           headers={"Content-Type": ctype})["error"]
        assert self.json_of("/api/fits")["fits"] == []
        assert self.json_of("/api/status")["status"]["counters"].get("submitted", 0) == before

    def test_an_upload_over_the_limit_gets_413(self) -> None:
        ctype, data = multipart([("big.hgx", b"\0" * (MAX_UPLOAD + 10))])
        r = self.json_of("/api/fits", 413, method="POST", body=data, headers={"Content-Type": ctype})
        assert "limit" in r["error"]

    def test_bad_settings_are_refused_with_the_range(self) -> None:
        model = (EXAMPLES / "nickel_film.hgx").read_bytes()
        for field, value in (("population", "2"), ("km", "0"), ("kr", "1.5"), ("generations", "x"),
                             ("method", "guess"), ("seed", "-1")):
            ctype, data = multipart([("nickel_film.hgx", model)], {field: value})
            r = self.json_of("/api/fits", 400, method="POST", body=data, headers={"Content-Type": ctype})
            assert field in r["error"]
        assert self.json_of("/api/fits")["fits"] == []


class TestFits(WebCase):
    def test_a_fit_from_the_browser_gives_the_files_orchester_fit_gives(self) -> None:
        settings = {"generations": "4", "population": "10", "seed": "3"}
        model = (EXAMPLES / "nickel_film.hgx").read_bytes()
        ctype, data = multipart([("nickel_film.hgx", model)], settings)
        made = self.json_of("/api/fits", 201, method="POST", body=data, headers={"Content-Type": ctype})["fits"]
        fid = made[0]["id"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            fit = self.json_of(f"/api/fits/{fid}")
            if fit["state"] in ("done", "failed"):
                break
            self.io_loop.run_sync(lambda: asyncio.sleep(0.3))
        assert fit["state"] == "done", fit["error"]
        assert fit["generation"] == 4 and fit["fom_history"] and fit["parameters"]
        assert fit["satellite"] == "local-0"
        assert sorted(fit["files"]) == sorted(["nickel_film.csv", "nickel_film_params.csv", "nickel_film_fom.csv",
                                               "nickel_film.hgx", "nickel_film.png", "nickel_film_sld.csv",
                                               "nickel_film_sld.png", "nickel_film.ort", "nickel_film.zip"])
        figure = self.json_of(f"/api/fits/{fid}/figure")
        assert figure["target_id"] is None and figure["doc"]["roots"]

        # the same model and settings through orchester fit's own job
        from orchester.genx.fits import FitSettings
        from orchester.genx.job import run_fits

        out = self.data / "cli"
        with self.cluster.client() as c:
            rows = run_fits(c, [EXAMPLES / "nickel_film.hgx"], FitSettings(generations=4, population=10, seed=3),
                            out, cache=None)
        assert rows[0]["status"] == "done"
        for name in ("nickel_film.csv", "nickel_film_params.csv", "nickel_film_fom.csv", "nickel_film_sld.csv"):
            r = self.fetch_api(f"/api/fits/{fid}/files/{name}")
            assert r.code == 200 and f'filename="{name}"' in r.headers["Content-Disposition"]
            assert r.body == (out / name).read_bytes(), name
        z = self.fetch_api(f"/api/fits/{fid}/files/nickel_film.zip")
        import zipfile

        assert sorted(zipfile.ZipFile(io.BytesIO(z.body)).namelist()) == sorted(
            ["nickel_film.csv", "nickel_film_params.csv", "nickel_film_fom.csv", "nickel_film.hgx", "nickel_film.png",
             "nickel_film_sld.csv", "nickel_film_sld.png", "nickel_film.ort"])
        for bad in ("../fit.json", "fit.json", "plot.json", urllib.parse.quote("../../etc/passwd", safe="")):
            assert self.fetch_api(f"/api/fits/{fid}/files/{bad}").code == 404

    def test_a_restarted_web_process_reads_its_fits_back(self) -> None:
        model = (EXAMPLES / "platinum_film.hgx").read_bytes()
        ctype, data = multipart([("platinum_film.hgx", model)], {"generations": "3", "population": "8"})
        fid = self.json_of("/api/fits", 201, method="POST", body=data, headers={"Content-Type": ctype})["fits"][0]["id"]

        async def restart() -> dict[str, Any]:
            await self.fits.close()  # the web process stops while the fit runs on the bus
            again = FitStore(self.data / "fits", self.client)
            assert again.load() == 1 and again.fits[fid].state in ("queued", "running")
            deadline = time.monotonic() + 240
            while again.fits[fid].state not in ("done", "failed") and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await again.close()
            return again.fits[fid].json()

        fit = self.io_loop.run_sync(restart, timeout=300)
        assert fit["state"] == "done", fit["error"]
        assert "platinum_film_fom.csv" in fit["files"]


class TestHistory(WebCase):
    """History from the journal's roll-ups (this class's cluster keeps a journal)."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.journal = Path(tempfile.mkdtemp(prefix="orchester-web-journal-"))
        cls.cluster = LocalCluster(satellites=1, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                                   liveness=3, env=TEST_ENV, log_level="WARNING", tags=["blue"],
                                   serve_args=["--journal", str(cls.journal / "j"),
                                               "--result-retention", "3"]).start()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        shutil.rmtree(cls.journal, ignore_errors=True)

    def test_a_task_the_orchestrator_forgot_shows_its_timeline_from_the_journal(self) -> None:
        from orchester.errors import RemoteError

        bad = self.submit(("fail", ("kaboom",), {}))[0]
        self.submit(*[("echo", (i,), {}) for i in range(6)])  # it keeps 3 finished tasks: the failed one goes

        async def forgotten() -> bool:
            try:
                await self.hub.client.show(bad, timeout=10)
            except RemoteError as exc:
                return exc.code == "unknown_task"
            return False

        assert self.io_loop.run_sync(forgotten, timeout=30)
        task = self.json_of(f"/api/tasks/{bad}")
        assert task["source"] == "history" and task["state"] == "failed" and task["kind"] == "fail"
        states = [h["state"] for h in task["history"]]
        assert states[-1] == "failed" and "running" in states and "dispatched" in states
        assert all(h["sat"] == "local-0" for h in task["history"] if h["state"] == "running")
        assert "kaboom" in task["error_type"]

    def test_tasks_per_minute_work_and_satellites_from_the_journal(self) -> None:
        started = time.time()
        since, until = int(started // 60) * 60 - 60, time.time() + 120
        earlier = self.json_of(f"/api/history?since={since}&until={until}&step=60")["buckets"]  # other tests' tasks
        blue = self.submit(*[("echo", (i,), {"tags": ["blue"]}) for i in range(4)])
        self.submit(*[("echo", (i,), {}) for i in range(6)], ("fail", ("x",), {}), ("fail", ("y",), {}))
        self.io_loop.run_sync(lambda: asyncio.sleep(0.5))  # a status or two for the fleet log
        h = self.json_of(f"/api/history?since={since}&until={until}&step=60")
        assert h["step"] == 60
        assert sum(b["done"] for b in h["buckets"]) - sum(b["done"] for b in earlier) == 10
        assert sum(b["failed"] for b in h["buckets"]) - sum(b["failed"] for b in earlier) == 2
        assert sum(b["busy_seconds"] for b in h["buckets"]) > 0
        assert max(b["satellites"] for b in h["buckets"]) == 1
        seen = [b for b in h["buckets"] if b["satellites_available"] is not None]  # the minutes the web saw
        assert seen and {(b["satellites_available"], b["slots"]) for b in seen} == {(1, 2)}
        tagged = self.json_of(f"/api/history?since={since}&until={until}&tag=blue")
        assert sum(b["done"] for b in tagged["buckets"]) == 4
        rows = self.json_of("/api/tasks?tag=blue&limit=100")["rows"]
        assert sorted(r["id"] for r in rows) == sorted(blue) and all(r["tags"] == ["blue"] for r in rows)
        assert self.json_of("/api/tasks?owner=nobody")["rows"] == []
        r = self.fetch_api(f"/api/history?since={since}&until={until}&format=csv")
        assert r.code == 200 and r.body.decode().splitlines()[0].startswith("t,done,failed")
        default = self.json_of("/api/history")  # the last day
        assert len(default["buckets"]) <= 300 and sum(b["done"] for b in default["buckets"]) >= 10
        for bad in ("since=2&until=1", "step=1", "step=inf", "since=soon"):
            assert self.json_of(f"/api/history?{bad}", 400)["status"] == 400


class TestNoJournal(WebCase):
    def test_history_without_a_journal_says_so(self) -> None:
        body = self.json_of("/api/history", 400)
        assert "journal" in body["error"]


def test_a_local_cluster_can_start_its_web_page(tmp_path: Path) -> None:
    import urllib.request

    with LocalCluster(satellites=1, workers=1, heartbeat_interval=FAST_HB, liveness=3, log_level="WARNING",
                      web=True, web_data_dir=str(tmp_path / "web")) as cluster:
        assert cluster.web_url.startswith("http://127.0.0.1:") and "?token=" in cluster.web_url
        base, token = cluster.web_url.split("?token=")
        req = urllib.request.Request(base + "api/status", headers={"Authorization": f"token {token}"})
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = json.loads(r.read())
            if body["status"].get("satellites") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [s["id"] for s in body["status"]["satellites"]] == ["local-0"]
        web = cluster.web_process
        assert web is not None and web.poll() is None
    assert web.poll() is not None  # stopped with the cluster


class TestPair(WebCase):
    """The web process follows the active server of a binary-star pair and marks the failover."""

    @classmethod
    def setUpClass(cls) -> None:
        from orchester.local.pair import LocalPair

        cls.cluster = LocalPair(satellites=1, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                                liveness=3, env=TEST_ENV, log_level="WARNING", ha_heartbeat=0.2).start()
        cls.cluster.wait_state("backup", "passive")  # type: ignore[attr-defined]

    def get_app(self) -> Any:
        app = super().get_app()
        pair: Any = self.cluster
        self.client = AsyncClient([pair.endpoints["primary"], pair.endpoints["backup"]], heartbeat_interval=FAST_HB)
        self.hub.client = self.fits.client = self.client
        return app

    def test_a_failover_is_followed_and_marked(self) -> None:
        pair: Any = self.cluster
        first = self.json_of("/api/status")["status"]["ha"]["state"]
        assert first == "active"
        before = self.submit(*[("echo", (i,), {}) for i in range(5)])
        pair.kill(pair.active_role())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.io_loop.run_sync(lambda: asyncio.sleep(0.3))
            body = self.json_of("/api/status")
            if body["marks"] and body["status"].get("ha", {}).get("state") == "active":
                break
        assert body["marks"], body
        assert body["status"]["ha"]["state"] == "active" and body["status_error"] == ""
        after = self.submit(("echo", ("after",), {}))
        rows = self.json_of("/api/tasks?limit=100")["rows"]
        assert set(before + after) <= {r["id"] for r in rows}


class TestFitNeverSent(WebCase):
    def test_a_fit_the_bus_never_got_is_submitted_again_after_a_restart(self) -> None:
        """The web process was killed between keeping a fit and sending it: the next one sends it."""
        import secrets as _secrets

        fid = _secrets.token_hex(16)
        folder = self.data / "fits" / fid
        folder.mkdir(mode=0o700)
        (folder / "model.hgx").write_bytes((EXAMPLES / "nickel_film.hgx").read_bytes())
        (folder / "fit.json").write_text(json.dumps({
            "id": fid, "name": "nickel_film", "file": "nickel_film.hgx", "state": "queued", "submitted": time.time(),
            "settings": {"generations": 3, "population": 8, "seed": 0, "km": 0.7, "kr": 0.7, "method": "best_1_bin"},
            "files": []}))

        async def restart() -> dict[str, Any]:
            again = FitStore(self.data / "fits", self.client)
            assert again.load() == 1
            deadline = time.monotonic() + 120
            while again.fits[fid].state not in ("done", "failed") and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await again.close()
            return again.fits[fid].json()

        fit = self.io_loop.run_sync(restart, timeout=180)
        assert fit["state"] == "done", fit["error"]
        assert "nickel_film.csv" in fit["files"]


class TestFitsTogether(WebCase):
    def test_fits_that_end_together_all_get_their_files(self) -> None:
        """Their files are drawn one fit at a time (matplotlib is not thread-safe)."""
        models = [(p.name, p.read_bytes()) for p in sorted(EXAMPLES.glob("*.hgx"))]
        models.append(("again_" + models[0][0], models[0][1]))  # four: under this test's upload limit
        ctype, data = multipart(models, {"generations": "3", "population": "8"})
        made = self.json_of("/api/fits", 201, method="POST", body=data, headers={"Content-Type": ctype})["fits"]
        assert len(made) == 4
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            fits = self.json_of("/api/fits")["fits"]
            if all(f["state"] in ("done", "failed") for f in fits):
                break
            self.io_loop.run_sync(lambda: asyncio.sleep(0.3))
        assert [f["error"] for f in fits if f["state"] != "done"] == []
