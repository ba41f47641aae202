"""The tornado application: pages, the JSON API under ``/api/``, the websocket ``/ws``.

Every request needs the access token (:class:`Auth`): as ``Authorization: token …``, as
``?token=…`` (the link printed at start; it then sets a cookie and the page reloads without it)
or as that cookie. A form post from a browser (cookie) also needs tornado's XSRF token; a
script that sends the token in a header needs none (no browser sends that header by itself).
The websocket takes same-origin connections only (tornado's ``check_origin``).

Errors are one JSON object ``{"error": …}`` for the API (and one short page otherwise), never
a traceback: 400 for bad input, 403 without the token, 404, 413 for an upload over the limit.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import tornado.httputil
import tornado.web
import tornado.websocket

from orchester.errors import OrchesterError, RemoteError
from orchester.web.fits import FIT_ID, FitStore, SettingsError
from orchester.web.hub import QUIET_TOPICS, Hub, Subscriber, dumps

log = logging.getLogger("orchester.web")

HERE = Path(__file__).parent
COOKIE = "orchester_token"
#: Task states the tasks page filters on.
TASK_STATES = ("pending", "dispatched", "running", "done", "failed", "cancelled", "expired", "quarantined")
#: Most rows one page of tasks has.
MAX_ROWS = 1000


@dataclass
class Auth:
    """The access token of one web process (printed at start, as Jupyter does)."""

    token: str

    def check(self, given: str | None) -> bool:
        """Whether ``given`` is the token (compared in constant time)."""
        return bool(given) and hmac.compare_digest(str(given).encode(), self.token.encode())


class Base(tornado.web.RequestHandler):
    """What every handler does: the token, XSRF for browser posts, errors without tracebacks."""

    api = False
    _by_header = False

    @property
    def hub(self) -> Hub:
        return cast(Hub, self.settings["hub"])

    @property
    def fits(self) -> FitStore:
        return cast(FitStore, self.settings["fits"])

    def prepare(self) -> Awaitable[None] | None:
        auth: Auth = self.settings["auth"]
        header = self.request.headers.get("Authorization", "")
        if header.lower().startswith("token ") and auth.check(header[6:].strip()):
            self._by_header = True
            return None
        query = self.get_query_argument("token", None)
        if query is not None and auth.check(query):
            self.set_cookie(COOKIE, auth.token, httponly=True, samesite="Strict",
                            secure=self.request.protocol == "https", expires_days=30)
            if self.request.method == "GET" and not self.api:  # the link's token out of the address bar
                self.redirect(re.sub(r"([?&])token=[^&]*&?", r"\1", self.request.uri or "/").rstrip("?&"))
            return None
        if auth.check(self.get_cookie(COOKIE)):
            return None
        raise tornado.web.HTTPError(403, "no valid token: open the link printed when the web server "
                                    "started (…/?token=…), or send 'Authorization: token …'")

    def check_xsrf_cookie(self) -> None:
        """XSRF applies to what a browser sends with its cookie; a request with the token in a header is a script's."""
        header = self.request.headers.get("Authorization", "")
        if header.lower().startswith("token ") and self.settings["auth"].check(header[6:].strip()):
            return
        try:
            super().check_xsrf_cookie()
        except tornado.web.HTTPError:
            raise tornado.web.HTTPError(403, "missing or wrong XSRF token: reload the page and try again (a "
                                        "script sends 'Authorization: token …' instead)") from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
            reason = exc.log_message % exc.args if exc.args else exc.log_message
        if self.api or self.request.path.startswith("/api/"):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": reason, "status": status_code}))
        else:
            self.finish(self.render_string("error.html", status=status_code, reason=reason))

    def json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(dumps(value))

    def bad(self, message: str) -> tornado.web.HTTPError:
        return tornado.web.HTTPError(400, message.replace("%", "%%"))


class Api(Base):
    api = True


# ------------------------------------------------------------------ pages
class Page(Base):
    """A page: a template with the XSRF token, the figures' JSON and nothing else server-side."""

    template = ""

    def get(self, *args: str) -> None:
        self.xsrf_token  # noqa: B018  (sets the XSRF cookie the page's posts send back)
        self.render(self.template, page=self.template.removesuffix(".html"), args=args)


class OverviewPage(Page):
    template = "overview.html"


class TasksPage(Page):
    template = "tasks.html"


class TaskPage(Page):
    template = "task.html"


class FitsPage(Page):
    template = "fits.html"


class FitPage(Page):
    template = "fit.html"


class HistoryPage(Page):
    template = "history.html"


# ------------------------------------------------------------------ API
class StatusApi(Api):
    """``GET /api/status``: the orchestrator's last status, the time series and the failovers."""

    def get(self) -> None:
        self.json(self.hub.overview())


class FiguresApi(Api):
    """``GET /api/figures/{name}``: an empty live figure (bokeh JSON): ``fom`` or ``overview``."""

    def get(self, name: str) -> None:
        from orchester.web.plots import fom_figure, history_figure, overview_figures

        if name == "fom":
            self.json(fom_figure())
        elif name == "history":
            self.json(history_figure())
        elif name == "overview":
            self.json(overview_figures())
        else:
            raise tornado.web.HTTPError(404, "no such figure")


def _number(handler: Base, name: str, lo: float, hi: float) -> float | None:
    raw = handler.get_query_argument(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise handler.bad(f"{name}: {raw[:40]!r} is not a number") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise handler.bad(f"{name}: {raw[:40]} is out of range ({lo:g} to {hi:g})")
    return value


def _when(handler: Base, name: str) -> float | None:
    """A date filter: seconds since the epoch, or an ISO date (``2026-11-30`` or ``2026-11-30T12:00``)."""
    raw = handler.get_query_argument(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        from datetime import datetime

        try:
            value = datetime.fromisoformat(raw).timestamp()
        except (ValueError, OverflowError, OSError):
            raise handler.bad(f"{name}: {raw[:40]!r} is neither seconds since 1970 nor an ISO date") from None
    if not math.isfinite(value) or not 0 <= value <= 253_402_300_799:  # up to the year 9999
        raise handler.bad(f"{name}: {raw[:40]} is out of range")
    return value


class TasksApi(Api):
    """``GET /api/tasks?state=&kind=&owner=&tag=&since=&until=&limit=&format=csv``: the whole history, newest first.

    Filtered on the orchestrator (from its journal when it keeps one). Pages: ``until`` = the
    ``submitted`` of the last row of the previous page.
    """

    async def get(self) -> None:
        state = self.get_query_argument("state", "").strip() or None
        if state is not None and state not in TASK_STATES:
            raise self.bad(f"state: {state[:40]!r} is not one of {', '.join(TASK_STATES)}")
        kind = self.get_query_argument("kind", "").strip() or None
        if kind is not None and (len(kind) > 256 or not kind.isprintable()):
            raise self.bad("kind: at most 256 printable characters")
        owner = self.get_query_argument("owner", "").strip() or None
        if owner is not None and (len(owner) > 256 or not owner.isprintable()):
            raise self.bad("owner: at most 256 printable characters")
        tag = self.get_query_argument("tag", "").strip() or None
        if tag is not None and (len(tag) > 256 or not tag.isprintable()):
            raise self.bad("tag: at most 256 printable characters")
        since, until = _when(self, "since"), _when(self, "until")
        limit = int(_number(self, "limit", 1, MAX_ROWS) or 100)
        fmt = self.get_query_argument("format", "json")
        if fmt not in ("json", "csv"):
            raise self.bad("format: json or csv")
        try:
            rows = await self.hub.client.history(state=state, kind=kind, since=since, until=until, limit=limit,
                                                 owner=owner, tag=tag, timeout=30)
        except (OrchesterError, TimeoutError) as exc:
            raise tornado.web.HTTPError(503, f"the orchestrator did not answer: {exc}".replace("%", "%%")) from None
        rows = sorted(rows, key=lambda r: r.get("submitted") or 0, reverse=True)[:limit]
        if fmt == "csv":
            buf = io.StringIO()
            cols = ("id", "kind", "state", "attempts", "satellite", "owner", "tags", "submitted", "finished", "error")
            w = csv.writer(buf)
            w.writerow(cols)
            for r in rows:
                w.writerow([_csv_cell(" ".join(map(str, r.get(c) or [])) if c == "tags" else r.get(c)) for c in cols])
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="tasks.csv"')
            self.finish(buf.getvalue())
            return
        more = rows[-1].get("submitted") if len(rows) == limit else None
        self.json({"rows": rows, "limit": limit, "next_until": more})


def _csv_cell(value: Any) -> str:
    """A cell of a CSV export: text that a spreadsheet never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class HistoryApi(Api):
    """``GET /api/history?since=&until=&step=&kind=&tag=&format=csv``: per step, tasks ended, utilisation
    and satellites, from the journal's roll-ups (and this process's fleet log for what was available).

    Defaults: the last 24 hours, a step that gives at most about 300 points.
    """

    async def get(self) -> None:
        now = time.time()
        until = _when(self, "until") or now
        since = _when(self, "since") or until - 86400
        if since >= until:
            raise self.bad("since must come before until")
        step = _number(self, "step", 60, 366 * 86400)
        if step is None:
            step = max(60.0, math.ceil((until - since) / 300 / 60) * 60)
        kind = self.get_query_argument("kind", "").strip() or None
        tag = self.get_query_argument("tag", "").strip() or None
        for name, value in (("kind", kind), ("tag", tag)):
            if value is not None and (len(value) > 256 or not value.isprintable()):
                raise self.bad(f"{name}: at most 256 printable characters")
        try:
            roll = await self.hub.client.rollup(since, until, step, kind=kind, tag=tag, timeout=30)
        except RemoteError as exc:
            raise self.bad(exc.message if hasattr(exc, "message") else str(exc)) from None
        except (OrchesterError, TimeoutError) as exc:
            raise tornado.web.HTTPError(503, f"the orchestrator did not answer: {exc}".replace("%", "%%")) from None
        buckets = []
        for b in roll["buckets"]:
            seen = self.hub.fleet.span(b["t"], roll["step"])
            sats, slots = (None, None) if seen is None else seen
            util = None if not slots else min(1.0, b["busy_seconds"] / (slots * roll["step"]))
            buckets.append({**b, "satellites_available": sats, "slots": slots, "utilisation": util,
                            "workers_busy": round(b["busy_seconds"] / roll["step"], 3)})
        if self.get_query_argument("format", "json") == "csv":
            buf = io.StringIO()
            cols = ("t", "done", "failed", "busy_seconds", "workers_busy", "satellites", "satellites_available",
                    "slots", "utilisation")
            w = csv.writer(buf)
            w.writerow(cols)
            for b in buckets:
                w.writerow(["" if b.get(c) is None else b[c] for c in cols])
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="history.csv"')
            self.finish(buf.getvalue())
            return
        self.json({"since": since, "until": until, "step": roll["step"], "buckets": buckets})


class TaskApi(Api):
    """``GET /api/tasks/{id}``: one task with its timeline (every transition, its reason and satellite)."""

    async def get(self, tid: str) -> None:
        if len(tid) > 256 or not tid.isprintable():
            raise self.bad("not a task id")
        try:
            self.json(await self.hub.client.show(tid, timeout=10))
        except RemoteError as exc:
            if exc.code in ("unknown_task", "not_found"):
                raise tornado.web.HTTPError(404, "no such task") from None
            raise self.bad(str(exc)) from None
        except (OrchesterError, TimeoutError) as exc:
            raise tornado.web.HTTPError(503, f"the orchestrator did not answer: {exc}".replace("%", "%%")) from None


class TaskResultApi(Api):
    """``GET /api/tasks/{id}/result``: a finished task's result, as a JSON download.

    Only a task that is done and whose result the orchestrator still keeps (404 otherwise);
    arrays become lists (at most :data:`MAX_RESULT_ITEMS` numbers), bytes their size.
    """

    async def get(self, tid: str) -> None:
        if len(tid) > 256 or not tid.isprintable():
            raise self.bad("not a task id")
        client = self.hub.client
        try:
            task = await client.show(tid, timeout=10)
            if task.get("state") != "done" or not task.get("result_retained"):
                raise tornado.web.HTTPError(404, "no result: the task is not done, or its result is no longer kept")
            value = await client.result(tid, timeout=30)
        except RemoteError as exc:
            raise tornado.web.HTTPError(404, f"no result: {exc}".replace("%", "%%")) from None
        except (OrchesterError, TimeoutError) as exc:
            raise tornado.web.HTTPError(503, f"the orchestrator did not answer: {exc}".replace("%", "%%")) from None
        self.set_header("Content-Type", "application/json")
        self.set_header("Content-Disposition", f'attachment; filename="result-{tid[:32]}.json"')
        self.finish(dumps(_arrays_as_lists(value)))


#: Most numbers of the arrays of one result turned into JSON lists.
MAX_RESULT_ITEMS = 10_000_000


def _arrays_as_lists(value: Any, depth: int = 0) -> Any:
    """``value`` with numpy arrays (and numpy scalars) as plain lists and numbers, for JSON."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= MAX_RESULT_ITEMS else f"<array {value.shape} {value.dtype}>"
    if isinstance(value, np.generic):
        return value.item()
    if depth > 32:
        return None
    if isinstance(value, dict):
        return {k: _arrays_as_lists(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_arrays_as_lists(v, depth + 1) for v in value]
    return value


@tornado.web.stream_request_body
class Upload(Api):
    """A POST of ``model`` files (multipart), streamed and bounded: ``max_upload`` bytes, 413 beyond."""

    def prepare(self) -> Awaitable[None] | None:
        super().prepare()
        self._body = bytearray()
        self._too_large = False
        if self.request.method != "POST":
            return None
        limit: int = self.settings["max_upload"]
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self._refuse_size(limit)
            return None
        connection: Any = self.request.connection  # an HTTP1Connection: it can take a larger body than the default
        connection.set_max_body_size(limit + 1)
        return None

    def _refuse_size(self, limit: int) -> None:
        self._too_large = True
        raise tornado.web.HTTPError(413, f"upload larger than the limit of {limit / 1e6:g} MB "
                                    "(orchester web --max-upload)")

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        if len(self._body) + len(chunk) > self.settings["max_upload"]:
            self._refuse_size(self.settings["max_upload"])
        self._body += chunk

    def models(self) -> tuple[list[tornado.httputil.HTTPFile], dict[str, str]]:
        """The ``model`` files (1 to 100) and the other fields of the body (UTF-8 text, 100 characters each)."""
        args: dict[str, list[bytes]] = {}
        files: dict[str, list[tornado.httputil.HTTPFile]] = {}
        tornado.httputil.parse_body_arguments(self.request.headers.get("Content-Type", ""), bytes(self._body),
                                              args, files, self.request.headers)
        models = files.get("model", [])
        if not models:
            raise self.bad("no model file: send one or more .hgx files as 'model'")
        if len(models) > 100:
            raise self.bad("at most 100 models at once")
        try:
            form = {k: v[-1].decode("utf-8", "strict")[:100] for k, v in args.items() if k != "_xsrf"}
        except UnicodeDecodeError:
            raise self.bad("settings must be UTF-8 text") from None
        return models, form


class ModelsApi(Upload):
    """``POST /api/models`` (multipart: one ``model``): what the file holds — data sets, fitted
    parameters and the fit settings stored in it (the fits page shows them as the defaults).
    Nothing is kept or run; 400 for a file that is not a GenX model."""

    async def post(self) -> None:
        from orchester.genx.inspect import ModelError, inspect_model

        models, _ = self.models()
        m = models[0]
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, inspect_model, m.body)
        except ModelError as exc:
            raise self.bad(f"{(m.filename or 'model')[:100]}: {exc}") from None
        self.json({"file": (m.filename or "")[:300], **info.to_json()})


class FitsApi(Upload):
    """``GET /api/fits``: every fit; ``POST /api/fits`` (multipart: ``model`` files, settings fields): new fits.

    Each model is checked (400 for a file that is not a GenX model, and nothing runs) before any
    fit is submitted.
    """

    def get(self) -> None:
        fits = sorted(self.fits.fits.values(), key=lambda f: f.submitted, reverse=True)
        self.json({"fits": [{k: v for k, v in f.json().items() if k != "fom_history"} for f in fits]})

    async def post(self) -> None:
        models, form = self.models()
        from orchester.genx.inspect import ModelError

        made: list[Any] = []
        for m in models:
            try:
                made.append(await self.fits.add(m.filename or "model.hgx", m.body, form))
            except (ModelError, SettingsError) as exc:
                if not made:
                    raise self.bad(f"{(m.filename or 'model')[:100]}: {exc}") from None
                made.append({"file": (m.filename or "")[:100], "error": str(exc)})
        self.set_status(201)
        self.json({"fits": [f if isinstance(f, dict) else {"id": f.id, "name": f.name, "state": f.state}
                            for f in made]})


class FitApi(Api):
    """``GET /api/fits/{id}``: one fit: state, generation, figure of merit (and its history), files."""

    def get(self, fid: str) -> None:
        fit = self.fits.fits.get(fid) if FIT_ID.fullmatch(fid) else None
        if fit is None:
            raise tornado.web.HTTPError(404, "no such fit")
        self.json(fit.json())


class FitFigureApi(Api):
    """``GET /api/fits/{id}/figure``: a finished fit's data and fit (bokeh JSON)."""

    def get(self, fid: str) -> None:
        body = self.fits.figure(fid) if FIT_ID.fullmatch(fid) else None
        if body is None:
            raise tornado.web.HTTPError(404, "no figure: the fit is not done")
        self.set_header("Content-Type", "application/json")
        self.finish(body)


class FitFileApi(Api):
    """``GET /api/fits/{id}/files/{name}``: one of a finished fit's files, as a download."""

    async def get(self, fid: str, name: str) -> None:
        path = self.fits.file(fid, name) if FIT_ID.fullmatch(fid) else None
        if path is None:
            raise tornado.web.HTTPError(404, "no such file")
        types = {".csv": "text/csv; charset=utf-8", ".png": "image/png", ".zip": "application/zip",
                 ".hgx": "application/x-hdf5"}
        self.set_header("Content-Type", types.get(path.suffix, "application/octet-stream"))
        self.set_header("Content-Disposition", f'attachment; filename="{name}"')
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.write(chunk)
                    await self.flush()
        except OSError:
            raise tornado.web.HTTPError(404, "the file is gone") from None
        self.finish()


class Events(tornado.websocket.WebSocketHandler):
    """``/ws``: JSON batches of events (``{"events": [...], "dropped": n}``), at most ten a second.

    ``?topics=task:,progress:`` says what comes (prefixes; by default the events that come a few at
    a time: satellites, the pair, control, progress). Task events are followed only while a
    browser asks for them. Same origin only; the token as for every request (the cookie, in a
    browser).
    """

    sub: Subscriber | None = None
    api = True

    def prepare(self) -> Awaitable[None] | None:
        return Base.prepare(cast(Base, self))

    def open(self, *args: str, **kwargs: str) -> None:
        hub: Hub = self.settings["hub"]
        raw = self.get_query_argument("topics", "")
        topics = tuple(t[:100] for t in raw.split(",") if t)[:20] or QUIET_TOPICS
        self.sub = hub.subscribe(self._send, self._busy, topics)

    def _send(self, text: str) -> Awaitable[None] | None:
        self._pending = self.write_message(text)
        return self._pending

    def _busy(self) -> bool:
        pending = getattr(self, "_pending", None)
        return pending is not None and not pending.done()

    def on_message(self, message: str | bytes) -> None:
        pass  # nothing is taken from the browser on this socket

    def on_close(self) -> None:
        if self.sub is not None:
            self.settings["hub"].unsubscribe(self.sub)


def make_app(hub: Hub, fits: FitStore, auth: Auth, *, max_upload: int = 100 * 1024 * 1024,
             cookie_secret: str | None = None) -> tornado.web.Application:
    """The application: pages, API and websocket on ``hub`` and ``fits``, guarded by ``auth``."""
    import bokeh

    bokeh_js = Path(bokeh.__file__).parent / "server" / "static" / "js"
    return tornado.web.Application(
        [
            (r"/", OverviewPage), (r"/tasks", TasksPage), (r"/tasks/([^/]+)", TaskPage),
            (r"/fits", FitsPage), (r"/fits/([0-9a-f]{32})", FitPage), (r"/history", HistoryPage),
            (r"/api/history", HistoryApi),
            (r"/api/status", StatusApi), (r"/api/figures/([a-z]+)", FiguresApi),
            (r"/api/tasks", TasksApi), (r"/api/tasks/([^/]+)", TaskApi),
            (r"/api/tasks/([^/]+)/result", TaskResultApi),
            (r"/api/fits", FitsApi), (r"/api/models", ModelsApi), (r"/api/fits/([0-9a-f]{32})", FitApi),
            (r"/api/fits/([0-9a-f]{32})/figure", FitFigureApi),
            (r"/api/fits/([0-9a-f]{32})/files/([^/]+)", FitFileApi),
            (r"/ws", Events),
            (r"/bokeh/(.*)", tornado.web.StaticFileHandler, {"path": str(bokeh_js)}),
        ],
        hub=hub, fits=fits, auth=auth, max_upload=max_upload,
        template_path=str(HERE / "templates"), static_path=str(HERE / "static"),
        xsrf_cookies=True, xsrf_cookie_kwargs={"samesite": "Strict", "httponly": False},
        cookie_secret=cookie_secret or os.urandom(32).hex(), autoescape="xhtml_escape",
        default_handler_class=NotFound, serve_traceback=False, compress_response=True,
        websocket_ping_interval=20, started=time.time())


class NotFound(Base):
    """Any other address: 404 (after the token check, so nothing is told without it)."""

    def get(self, *args: str) -> None:
        raise tornado.web.HTTPError(404, "no such page")

    post = get
