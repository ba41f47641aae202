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
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import time
import urllib.parse
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import tornado.httputil
import tornado.web
import tornado.websocket

from orchester.errors import OrchesterError, RemoteError
from orchester.render import csv_text
from orchester.web.fits import FIT_ID, INSPECTORS, WRITER, FitStore, SettingsError
from orchester.web.hub import QUIET_TOPICS, Hub, Subscriber, dumps
from orchester.web.series import MAX_DATASETS, SeriesStore

log = logging.getLogger("orchester.web")

HERE = Path(__file__).parent
COOKIE = "orchester_token"
#: Task states the tasks page filters on.
TASK_STATES = ("pending", "dispatched", "running", "done", "failed", "cancelled", "expired", "quarantined")
#: Most rows one page of tasks has.
MAX_ROWS = 1000
#: Browsers following the events at once, at most.
MAX_BROWSERS = 256
#: Uploads being received or checked at once, at most.
MAX_UPLOADS = 4
#: Models in one upload, at most.
MAX_MODELS = 100
#: Requests a second that reach the bus (tasks, history, a task, a result), and the burst: as much for the
#: browsers' pages (the cookie) and for scripts (the token in a header), so that a script never starves
#: the pages; both budgets with the hub's status stay within the orchestrator's default ``--request-rate``
#: (50 a second, in bursts of 50, for this process's key), in rate and in burst: the status always gets through.
BUS_REQUESTS, BUS_BURST = 20.0, 20.0
#: What an upload may send beyond its limit before the connection is cut (so that the 413 is read).
DRAIN = 256 * 1024 * 1024


class Budget:
    """A token bucket: what the pages may ask of the bus (the orchestrator limits one client's requests
    a second; the hub's own status request must not be crowded out by a script)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, time.monotonic()

    def take(self) -> bool:
        """One request, if the budget allows it now."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Auth:
    """The access token of one web process (printed at start, as Jupyter does).

    A browser that came with the token gets a session cookie instead: a value derived from the
    token (not the token, which a cookie sent to another server of this host — cookies ignore
    ports — would give away), named after the port.
    """

    token: str
    port: int = 0  #: the port served on (set once bound): it names the cookie

    def check(self, given: str | None) -> bool:
        """Whether ``given`` is the token (compared in constant time)."""
        return bool(given) and hmac.compare_digest(str(given).encode(), self.token.encode())

    @property
    def session(self) -> str:
        """The cookie's value: an HMAC of the token."""
        return hmac.new(self.token.encode(), b"orchester web session", hashlib.sha256).hexdigest()

    @property
    def cookie(self) -> str:
        """The cookie's name."""
        return f"{COOKIE}_{self.port}" if self.port else COOKIE

    def check_session(self, given: str | None) -> bool:
        """Whether ``given`` is the session cookie's value (compared in constant time)."""
        return bool(given) and hmac.compare_digest(str(given).encode(), self.session.encode())


def authenticate(handler: tornado.web.RequestHandler, page: bool) -> str:
    """Let the request through with the token (header, link) or the session cookie; 403 otherwise.

    The link (``?token=…``) sets the cookie, and a page asked for with it is sent again without it.
    Returns how the request came in: ``"script"`` (the header) or ``"browser"`` (the link or the cookie).
    """
    auth: Auth = handler.settings["auth"]
    header = handler.request.headers.get("Authorization", "")
    if header.lower().startswith("token ") and auth.check(header[6:].strip()):
        return "script"
    query = handler.get_query_argument("token", None)
    if query is not None and auth.check(query):
        handler.set_cookie(auth.cookie, auth.session, httponly=True, samesite="Strict",
                           secure=handler.request.protocol == "https")
        if handler.request.method == "GET" and page:  # the token out of the address bar, on this server
            rest = [(k, v) for k, vs in handler.request.query_arguments.items() if k != "token" for v in vs]
            target = "/" + handler.request.path.lstrip("/\\")
            handler.redirect(target + ("?" + urllib.parse.urlencode(rest) if rest else ""))
        return "browser"
    if auth.check_session(handler.get_cookie(auth.cookie)):
        return "browser"
    raise tornado.web.HTTPError(403, "no valid token: open the link printed when the web server "
                                "started (…/?token=…), or send 'Authorization: token …'")


def redacted_summary(handler: tornado.web.RequestHandler) -> str:
    """The request as the log shows it: never the token."""
    uri = re.sub(r"([?&]token=)[^&]*", r"\1…", handler.request.uri or "")
    return f"{handler.request.method} {uri[:300]} ({handler.request.remote_ip})"


class Base(tornado.web.RequestHandler):
    """What every handler does: the token, XSRF for browser posts, errors without tracebacks."""

    api = False

    @property
    def hub(self) -> Hub:
        return cast(Hub, self.settings["hub"])

    @property
    def fits(self) -> FitStore:
        return cast(FitStore, self.settings["fits"])

    @property
    def series(self) -> SeriesStore:
        return cast(SeriesStore, self.settings["series"])

    _request_summary = redacted_summary

    def set_default_headers(self) -> None:
        self.set_header("X-Frame-Options", "DENY")  # no other page frames these (another port is same-site)
        self.set_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    via = "browser"

    def prepare(self) -> Awaitable[None] | None:
        self.via = authenticate(self, page=not self.api)
        return None

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

    def bus(self) -> None:
        """A request that reaches the bus: 429 when the pages asked too much of it this second."""
        if not self.settings["bus_budget"][self.via].take():
            raise tornado.web.HTTPError(429, "too many requests to the bus from the web pages: retry in a moment")

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
    """A page: its template (given in the route) with the XSRF token; the data comes from ``/api/``."""

    def initialize(self, template: str) -> None:
        self.template = template

    def get(self, *args: str) -> None:
        self.xsrf_token  # noqa: B018  (sets the XSRF cookie the page's posts send back)
        self.render(self.template, page=self.template.removesuffix(".html"), args=args)


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
        self.bus()
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
                w.writerow([csv_text(" ".join(map(str, r.get(c) or [])) if c == "tags" else r.get(c)) for c in cols])
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="tasks.csv"')
            self.finish(buf.getvalue())
            return
        more = rows[-1].get("submitted") if len(rows) == limit else None
        self.json({"rows": rows, "limit": limit, "next_until": more})




class HistoryApi(Api):
    """``GET /api/history?since=&until=&step=&kind=&tag=&format=csv``: per step, tasks ended, utilisation
    and satellites, from the journal's roll-ups (and this process's fleet log for what was available).

    Defaults: the last 24 hours, a step that gives at most about 300 points.
    """

    async def get(self) -> None:
        now = time.time()
        given_until, given_since = _when(self, "until"), _when(self, "since")
        until = now if given_until is None else given_until
        since = until - 86400 if given_since is None else given_since
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
        self.bus()
        try:
            roll = await self.hub.client.rollup(since, until, step, kind=kind, tag=tag, timeout=30)
        except RemoteError as exc:
            raise self.bad(exc.message if hasattr(exc, "message") else str(exc)) from None
        except (OrchesterError, TimeoutError) as exc:
            raise tornado.web.HTTPError(503, f"the orchestrator did not answer: {exc}".replace("%", "%%")) from None
        buckets = []
        first = roll["buckets"][0]["t"] if roll["buckets"] else since
        fleet = self.hub.fleet.spans(first, roll["step"], len(roll["buckets"]))
        for b, seen in zip(roll["buckets"], fleet, strict=True):
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
        self.bus()
        if len(tid) > 256 or not tid.isprintable():
            raise self.bad("not a task id")
        try:  # a task the orchestrator no longer holds: its row and transitions from the history (the journal)
            self.json(await self.hub.client.show(tid, timeout=30, journal=True))
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
        self.bus()
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
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, result_json, value)
        except ValueError as exc:
            raise tornado.web.HTTPError(413, str(exc).replace("%", "%%")) from None
        self.set_header("Content-Type", "application/json")
        self.set_header("Content-Disposition", f'attachment; filename="result-{tid[:32]}.json"')
        self.finish(text)


#: Most values (numbers, strings, …) of one result offered as JSON.
MAX_RESULT_ITEMS = 10_000_000


def result_json(value: Any) -> str:
    """A task's result as JSON, whole: arrays as lists, bytes as their size, non-finite numbers as
    ``null``; :class:`ValueError` when it holds more than :data:`MAX_RESULT_ITEMS` values."""
    import numpy as np

    count = 0

    def plain_value(v: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > MAX_RESULT_ITEMS or depth > 64:
            raise ValueError(f"the result is too large or too deep to offer as JSON (over {MAX_RESULT_ITEMS:,} "
                             "values): fetch it with orchester.Client.result")
        if isinstance(v, np.ndarray):
            count += int(v.size)
            if count > MAX_RESULT_ITEMS:
                return plain_value(None, 65)
            return plain_value(v.tolist(), depth + 1)
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, dict):
            return {str(k): plain_value(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain_value(x, depth + 1) for x in v]
        if isinstance(v, (bytes, bytearray, memoryview)):
            return f"<{len(v)} bytes>"
        return str(v)

    return json.dumps(plain_value(value, 0), allow_nan=False, separators=(",", ":"))


#: How uploads are parsed: the models, the settings and room to spare (tornado counts every part).
_PARSE = tornado.httputil.ParseBodyConfig(multipart=tornado.httputil.ParseMultipartConfig(
    max_parts=MAX_MODELS + MAX_DATASETS + 40))
#: The longest text field of an upload (``sequence`` may list a value per data file), and the others'.
LONG_FIELDS, MAX_LONG_FIELD, MAX_FIELD = frozenset({"sequence"}), 32 * 1024, 100


@tornado.web.stream_request_body
class Upload(Api):
    """A POST of ``model`` files (multipart), streamed and bounded: ``max_upload`` bytes, 413 beyond."""

    _slot = False

    async def prepare(self) -> None:  # type: ignore[override]
        super().prepare()
        self._body = bytearray()
        self._too_large = False
        if self.request.method != "POST":
            return
        limit: int = self.settings["max_upload"]
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > limit + DRAIN):
            self._refuse_size()  # at once (the connection closes: the client may not read the answer)
        if length is not None and int(length) > limit:
            self._too_large = True  # read and dropped, then answered: a client that sends it all reads the 413
        uploads: asyncio.Semaphore = self.settings["uploads"]
        if uploads.locked():
            raise tornado.web.HTTPError(503, f"{MAX_UPLOADS} uploads are being received or checked: try again "
                                        "in a moment")
        await uploads.acquire()
        self._slot = True
        connection: Any = self.request.connection  # an HTTP1Connection: it can take a larger body than the default
        connection.set_max_body_size(limit + DRAIN)  # a bounded excess is read and dropped: the 413 gets through

    def on_finish(self) -> None:
        self._release()

    def on_connection_close(self) -> None:
        self._release()
        super().on_connection_close()

    def _release(self) -> None:
        if self._slot:
            self._slot = False
            self.settings["uploads"].release()

    def _refuse_size(self) -> None:
        self._too_large = True
        self.set_header("Connection", "close")
        raise tornado.web.HTTPError(413, f"upload larger than the limit of {self.settings['max_upload'] / 1e6:g} MB "
                                    "(orchester web --max-upload)")

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        if len(self._body) + len(chunk) > self.settings["max_upload"]:
            self._too_large = True  # said in post(): never raise here, the connection would be cut
            self._body = bytearray()
            return
        self._body += chunk

    def models(self) -> tuple[list[tornado.httputil.HTTPFile], dict[str, str]]:
        """The ``model`` files (1 to 100) and the other fields of the body (UTF-8 text, 100 characters each)."""
        files, form = self.parts()
        models = files.get("model", [])
        if not models:
            raise self.bad("no model file: send one or more .hgx files as 'model'")
        if len(models) > MAX_MODELS:
            raise self.bad(f"at most {MAX_MODELS} models at once")
        return models, form

    def parts(self) -> tuple[dict[str, list[tornado.httputil.HTTPFile]], dict[str, str]]:
        """The files of the body by field name, and its other fields (UTF-8 text, 100 characters each,
        :data:`MAX_LONG_FIELD` for ``sequence``)."""
        if self._too_large:
            self._refuse_size()
        args: dict[str, list[bytes]] = {}
        files: dict[str, list[tornado.httputil.HTTPFile]] = {}
        ctype = self.request.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            raise self.bad("send the models as multipart/form-data (files named 'model')")
        body, self._body = bytes(self._body), bytearray()
        try:
            tornado.httputil.parse_body_arguments(ctype, body, args, files, self.request.headers,
                                                  config=_PARSE)
        except (tornado.httputil.HTTPInputError, UnicodeDecodeError, ValueError) as exc:
            raise self.bad(f"not a multipart upload this server reads: {str(exc)[:200]}") from None
        try:
            form = {k: v[-1].decode("utf-8", "strict") for k, v in args.items() if k != "_xsrf"}
        except UnicodeDecodeError:
            raise self.bad("settings must be UTF-8 text") from None
        for k, v in form.items():
            limit = MAX_LONG_FIELD if k in LONG_FIELDS else MAX_FIELD
            if len(v) > limit:
                raise self.bad(f"{k[:40]}: longer than {limit:,} characters")
        return files, form


#: The fields of a fit in the list of fits (its page has the rest), and most fits listed.
SUMMARY = frozenset({"id", "name", "file", "state", "submitted", "finished", "generation", "generations", "fom",
                     "error", "satellite"})
MAX_LISTED = 1000


class ModelsApi(Upload):
    """``POST /api/models`` (multipart: one ``model``): what the file holds — data sets, fitted
    parameters and the fit settings stored in it (the fits page shows them as the defaults).
    Nothing is kept or run; 400 for a file that is not a GenX model."""

    async def post(self) -> None:
        from orchester.genx.inspect import ModelError, inspect_model

        models, _ = self.models()
        m = models[0]
        try:
            info = await asyncio.get_running_loop().run_in_executor(INSPECTORS, inspect_model, m.body)
        except ModelError as exc:
            raise self.bad(f"{(m.filename or 'model')[:100]}: {exc}") from None
        except OrchesterError as exc:  # the inspection could not run: this server's trouble, not the file's
            raise tornado.web.HTTPError(503, f"the model could not be checked: {exc}".replace("%", "%%")) from None
        self.json({"file": (m.filename or "")[:300], **info.to_json()})


class FitsApi(Upload):
    """``GET /api/fits``: every fit; ``POST /api/fits`` (multipart: ``model`` files, settings fields): new fits.

    Each model is checked (400 for a file that is not a GenX model, and nothing runs) before any
    fit is submitted.
    """

    def get(self) -> None:
        fits = sorted(self.fits.fits.values(), key=lambda f: f.submitted, reverse=True)
        self.json({"fits": [{k: v for k, v in f.json().items() if k in SUMMARY} for f in fits[:MAX_LISTED]]})

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
            except OrchesterError as exc:  # the inspection could not run
                raise tornado.web.HTTPError(503, f"the model could not be checked: {exc}".replace("%", "%%")) from None
            except OSError as exc:
                raise tornado.web.HTTPError(507, f"the fit could not be kept: {exc.strerror}".replace("%", "%%")) \
                    from None
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
        await _send_file(self, path, name)


async def _send_file(handler: Base, path: Path, name: str) -> None:
    """Send one of a fit's or a series' files as a download (``name`` is one the store listed)."""
    types = {".csv": "text/csv; charset=utf-8", ".png": "image/png", ".zip": "application/zip",
             ".hgx": "application/x-hdf5"}
    handler.set_header("Content-Type", types.get(path.suffix, "application/octet-stream"))
    handler.set_header("Content-Disposition", f'attachment; filename="{name}"')
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                handler.write(chunk)
                await handler.flush()
    except OSError:
        raise tornado.web.HTTPError(404, "the file is gone") from None
    handler.finish()


class SeriesListApi(Upload):
    """``GET /api/series``: every series; ``POST /api/series`` (multipart: one ``model``, ``data`` files,
    settings fields, ``chain``, ``adjust_bounds``, ``sequence``): a new series of fits, one per data file.

    The model, the settings and the data files are checked (400, and nothing runs) before any fit
    is submitted.
    """

    def get(self) -> None:
        listed = sorted(self.series.series.values(), key=lambda s: s.submitted, reverse=True)[:MAX_LISTED]
        self.json({"series": [{"id": s.id, "name": s.name, "file": s.file, "state": s.state, "submitted": s.submitted,
                                "finished": s.finished, "chain": s.chain, "counts": self.series.counts(s),
                                "datasets": len(s.datasets)} for s in listed]})

    async def post(self) -> None:
        from orchester.genx.inspect import ModelError

        files, form = self.parts()
        models, data = files.get("model", []), files.get("data", [])
        if len(models) != 1:
            raise self.bad("a series fits one model: send one .hgx file as 'model'")
        if not data:
            raise self.bad("no data files: send the series' data files as 'data'")
        m = models[0]
        try:
            series = await self.series.add(m.filename or "model.hgx", m.body,
                                           [(d.filename or f"data_{i}", d.body) for i, d in enumerate(data)], form)
        except (ModelError, SettingsError) as exc:
            raise self.bad(f"{(m.filename or 'model')[:100]}: {exc}" if isinstance(exc, ModelError)
                           else str(exc)) from None
        except OrchesterError as exc:  # the inspection could not run
            raise tornado.web.HTTPError(503, f"the model could not be checked: {exc}".replace("%", "%%")) from None
        except OSError as exc:
            raise tornado.web.HTTPError(507, f"the series could not be kept: {exc.strerror}".replace("%", "%%")) \
                from None
        self.set_status(201)
        self.json({"id": series.id, "name": series.name, "datasets": len(series.datasets), "chain": series.chain})


class SeriesApi(Api):
    """``GET /api/series/{id}``: one series: its settings, and per dataset (in the order of the sequence)
    its fit's state, figure of merit and fitted parameters with error bars."""

    def get(self, sid: str) -> None:
        series = self.series.series.get(sid) if FIT_ID.fullmatch(sid) else None
        if series is None:
            raise tornado.web.HTTPError(404, "no such series")
        self.json(self.series.json(series))


class SeriesFigureApi(Api):
    """``GET /api/series/{id}/figure``: the series' figure (bokeh JSON), filled by the page."""

    async def get(self, sid: str) -> None:
        series = self.series.series.get(sid) if FIT_ID.fullmatch(sid) else None
        if series is None:
            raise tornado.web.HTTPError(404, "no such series")
        # made on the thread that draws every figure (bokeh is not thread-safe)
        item = await asyncio.get_running_loop().run_in_executor(WRITER, self.series.figure, series)
        self.json(item)


class SeriesFileApi(Api):
    """``GET /api/series/{id}/files/{name}``: ``series.csv``, ``series.png`` or ``series.zip`` of a finished series."""

    async def get(self, sid: str, name: str) -> None:
        path = self.series.file(sid, name) if FIT_ID.fullmatch(sid) else None
        if path is None:
            raise tornado.web.HTTPError(404, "no such file")
        await _send_file(self, path, name)


class Events(tornado.websocket.WebSocketHandler):
    """``/ws``: JSON batches of events (``{"events": [...], "dropped": n}``), at most ten a second.

    ``?topics=task:,progress:`` says what comes (prefixes; by default the events that come a few at
    a time: satellites, the pair, control, progress). Task events are followed only while a
    browser asks for them. Same origin only; the token as for every request (the cookie, in a
    browser).
    """

    sub: Subscriber | None = None
    _request_summary = redacted_summary

    def prepare(self) -> Awaitable[None] | None:
        authenticate(self, page=False)
        if len(self.settings["hub"].subscribers) >= MAX_BROWSERS:
            raise tornado.web.HTTPError(503, f"{MAX_BROWSERS} browsers follow the events already: try later")
        return None

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
             cookie_secret: str | None = None, tls: bool = False,
             series: SeriesStore | None = None) -> tornado.web.Application:
    """The application: pages, API and websocket on ``hub``, ``fits`` and ``series`` (by default a
    store in the ``series`` folder beside ``fits``'), guarded by ``auth``."""
    import bokeh

    bokeh_js = Path(bokeh.__file__).parent / "server" / "static" / "js"
    return tornado.web.Application(
        [
            (r"/", Page, {"template": "overview.html"}), (r"/tasks", Page, {"template": "tasks.html"}),
            (r"/tasks/([^/]+)", Page, {"template": "task.html"}), (r"/fits", Page, {"template": "fits.html"}),
            (r"/fits/([0-9a-f]{32})", Page, {"template": "fit.html"}),
            (r"/series/([0-9a-f]{32})", Page, {"template": "series.html"}),
            (r"/history", Page, {"template": "history.html"}),
            (r"/api/history", HistoryApi),
            (r"/api/status", StatusApi), (r"/api/figures/([a-z]+)", FiguresApi),
            (r"/api/tasks", TasksApi), (r"/api/tasks/([^/]+)", TaskApi),
            (r"/api/tasks/([^/]+)/result", TaskResultApi),
            (r"/api/fits", FitsApi), (r"/api/models", ModelsApi), (r"/api/fits/([0-9a-f]{32})", FitApi),
            (r"/api/fits/([0-9a-f]{32})/figure", FitFigureApi),
            (r"/api/fits/([0-9a-f]{32})/files/([^/]+)", FitFileApi),
            (r"/api/series", SeriesListApi), (r"/api/series/([0-9a-f]{32})", SeriesApi),
            (r"/api/series/([0-9a-f]{32})/figure", SeriesFigureApi),
            (r"/api/series/([0-9a-f]{32})/files/([^/]+)", SeriesFileApi),
            (r"/ws", Events),
            (r"/bokeh/(.*)", Static, {"path": str(bokeh_js)}),
        ],
        hub=hub, fits=fits, auth=auth, max_upload=max_upload,
        series=series if series is not None else SeriesStore(fits.root.parent / "series", fits),
        bus_budget={"browser": Budget(BUS_REQUESTS, BUS_BURST), "script": Budget(BUS_REQUESTS, BUS_BURST)},
        uploads=asyncio.Semaphore(MAX_UPLOADS),
        template_path=str(HERE / "templates"), static_path=str(HERE / "static"), static_handler_class=Static,
        xsrf_cookies=True, xsrf_cookie_kwargs={"samesite": "Strict", "httponly": True, "secure": tls},
        cookie_secret=cookie_secret or os.urandom(32).hex(), autoescape="xhtml_escape",
        default_handler_class=NotFound, serve_traceback=False, compress_response=True,
        websocket_ping_interval=20, started=time.time())


class Static(tornado.web.StaticFileHandler):
    """Static files (ours and BokehJS), with the token as for every request."""

    _request_summary = redacted_summary

    def prepare(self) -> Awaitable[None] | None:
        authenticate(self, page=False)
        return None


class NotFound(Base):
    """Any other address: 404 (after the token check, so nothing is told without it)."""

    def get(self, *args: str) -> None:
        raise tornado.web.HTTPError(404, "no such page")

    post = get
