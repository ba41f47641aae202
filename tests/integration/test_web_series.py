"""Series fits from the web API: one model, a series of data files, fitted by real GenX in satellite workers.

The same numbers as ``orchester fit --data`` (:func:`orchester.genx.series.run_series`) on the same
cluster; a chain starts each fit from the previous result, and a restarted web process takes a
chain up where it stopped.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from test_web import EXAMPLES, WebCase

from orchester.genx.fits import FitSettings
from orchester.genx.series import run_series
from orchester.web.app import make_app
from orchester.web.fits import FitStore
from orchester.web.series import SeriesStore, parse_sequence

pytestmark = pytest.mark.integration

SERIES = sorted((EXAMPLES / "series").glob("*.dat"))
MODEL = EXAMPLES / "nickel_film.hgx"


def upload(model: tuple[str, bytes] | None, data: list[tuple[str, bytes]],
           fields: dict[str, str] | None = None, models: int = 1) -> tuple[str, bytes]:
    """A multipart body: ``model`` (``models`` times), ``data`` files and plain fields."""
    boundary = "----orchester-series-boundary"
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts = [("model", *model)] * models if model is not None else []
    for field, filename, body in [*parts, *(("data", n, b) for n, b in data)]:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(body + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


def files(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


class SeriesCase(WebCase):
    def get_app(self) -> Any:
        app = super().get_app()
        self.series = app.settings["series"]
        return app

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.series.close, timeout=30)
        super().tearDown()

    def post_series(self, data: list[tuple[str, bytes]], fields: dict[str, str], status: int = 201,
                    model: tuple[str, bytes] | None = ("nickel_film.hgx", MODEL.read_bytes()), models: int = 1) -> Any:
        ctype, body = upload(model, data, fields, models)
        return self.json_of("/api/series", status, method="POST", body=body, headers={"Content-Type": ctype})

    def wait_done(self, sid: str, store: SeriesStore | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            s = self.json_of(f"/api/series/{sid}") if store is None else store.json(store.series[sid])
            if s["state"] == "done":
                return s
            self.io_loop.run_sync(lambda: asyncio.sleep(0.3))
        raise AssertionError(f"series {sid} did not end: {s['counts']}")


class TestSeries(SeriesCase):
    def test_a_series_gives_the_numbers_orchester_fit_gives(self) -> None:
        chosen = SERIES[:4]
        made = self.post_series(files(list(reversed(chosen))), {"generations": "6", "population": "10", "seed": "2"})
        assert made["datasets"] == 4 and made["chain"] is False
        s = self.wait_done(made["id"])
        # in the order of the sequence (the temperature in each file's name), every fit done
        assert [r["file"] for r in s["rows"]] == [p.name for p in chosen]
        assert [r["sequence"] for r in s["rows"]] == [300.0, 350.0, 400.0, 450.0]
        assert s["counts"]["done"] == 4 and all(r["state"] == "done" for r in s["rows"]), s["rows"]
        assert s["parameters"] and all({p["name"] for p in r["parameters"]} == set(s["parameters"]) for r in s["rows"])
        assert sorted(s["files"]) == ["series.csv", "series.png", "series.zip"]
        # each dataset is a fit with a page of its own, naming its data file
        fit = self.json_of(f"/api/fits/{s['rows'][0]['fit']}")
        assert fit["series"] == made["id"] and fit["data"] == chosen[0].name and fit["loader"] == "default"
        assert fit["name"] == "nickel_film_nickel_T300K" and "nickel_film_nickel_T300K_params.csv" in fit["files"]

        # the same series through orchester fit --data on the same cluster: the same numbers
        with self.cluster.client() as c:
            rows = run_series(c, MODEL, chosen, FitSettings(generations=6, population=10, seed=2), self.data / "cli")
        web = list(csv.DictReader(io.StringIO(self.fetch_api(f"/api/series/{made['id']}/files/series.csv")
                                              .body.decode())))
        cli = list(csv.DictReader(open(self.data / "cli" / "series.csv")))
        assert [r["fom"] for r in web] == [r["fom"] for r in cli] == [r["fom"] for r in rows]
        for w, c in zip(web, cli, strict=True):
            assert {k: v for k, v in w.items() if k != "file"} == {k: v for k, v in c.items() if k != "file"}
            assert w["file"] == Path(c["file"]).name
        png = self.fetch_api(f"/api/series/{made['id']}/files/series.png")
        assert png.code == 200 and png.body[:4] == b"\x89PNG"
        archive = self.fetch_api(f"/api/series/{made['id']}/files/series.zip").body
        names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
        assert "series.csv" in names and "0004_nickel_film_nickel_T450K/nickel_film_nickel_T450K_params.csv" in names
        assert not [n for n in names if n.endswith(".hgx")]  # (each fitted model is on its fit's page)
        # every fit's folder links to the series' one copy of the model
        folder = self.data / "series" / made["id"]
        assert all((self.data / "fits" / r["fit"] / "model.hgx").stat().st_ino == (folder / "model.hgx").stat().st_ino
                   for r in s["rows"])
        figure = self.json_of(f"/api/series/{made['id']}/figure")
        assert figure["doc"]["roots"]
        listed = self.json_of("/api/series")["series"]
        assert [x["id"] for x in listed] == [made["id"]] and listed[0]["counts"]["done"] == 4
        for bad in ("series.json", "../series.json", "model.hgx"):
            assert self.fetch_api(f"/api/series/{made['id']}/files/{bad}").code == 404
        assert self.fetch_api(f"/api/series/{'0' * 32}").code == 404

    def test_a_chain_starts_each_fit_from_the_previous_result(self) -> None:
        made = self.post_series(files(SERIES[:3]), {"generations": "5", "population": "10", "seed": "4",
                                                    "chain": "yes", "adjust_bounds": "yes"})
        s = self.wait_done(made["id"])
        fits = [self.json_of(f"/api/fits/{r['fit']}") for r in s["rows"]]
        assert all(f["state"] == "done" for f in fits), [f["error"] for f in fits]
        assert fits[0]["start"] == {}  # the model's own start values
        for before, after in zip(fits, fits[1:], strict=False):
            for p in before["parameters"]:  # each value, its bounds centred on it with the same width
                start = after["start"][p["name"]]
                assert start["value"] == p["value"]
                assert start["min"] + start["max"] == pytest.approx(2 * p["value"])
                assert start["max"] - start["min"] == pytest.approx(p["max"] - p["min"])
            assert after["submitted"] >= before["finished"]  # one after another

    def test_a_dataset_that_fails_is_a_row_with_its_error(self) -> None:
        data = [*files(SERIES[:2]), ("broken_T999K.dat", b"these are not numbers\n")]
        made = self.post_series(data, {"generations": "3", "population": "8"})
        s = self.wait_done(made["id"])
        states = {r["file"]: r for r in s["rows"]}
        assert states["broken_T999K.dat"]["state"] == "failed" and states["broken_T999K.dat"]["error"]
        assert [states[p.name]["state"] for p in SERIES[:2]] == ["done", "done"]
        table = list(csv.DictReader(io.StringIO(self.fetch_api(f"/api/series/{made['id']}/files/series.csv")
                                                .body.decode())))
        assert [r["status"] for r in table] == ["done", "done", "failed"] and table[2]["error"]

    def test_bad_uploads_are_refused_and_nothing_runs(self) -> None:
        two = files(SERIES[:2])
        cases = [
            (two, {}, {"model": None}, "one model"),
            (two, {}, {"models": 2}, "one model"),
            ([], {}, {}, "no data files"),
            (two, {"sequence": "1, 2, 3"}, {}, "3 numbers for 2"),
            (two, {"sequence": "1, x"}, {}, "one number per data file"),
            (two, {"adjust_bounds": "yes"}, {}, "only for a chained series"),
            (two, {"chain": "maybe"}, {}, "not yes or no"),
            (two, {"generations": "0"}, {}, "generations"),
            (two, {"sequence": "1, " + "9" * 400}, {}, "finite"),
            ([("T" + "9" * 400 + ".dat", b"1 2 3\n"), ("T1.dat", b"1 2 3\n")], {"sequence": "1e999 2"}, {}, "finite"),
            (two, {"km": "0." + "5" * 200}, {}, "longer than 100"),
            ([("empty.dat", b"")], {}, {}, "empty"),
            (two, {}, {"model": ("fake.hgx", b"not a model")}, "fake.hgx"),
        ]
        for data, fields, extra, said in cases:
            kw: dict[str, Any] = {}
            if "model" in extra:
                kw["model"] = extra["model"]
            if "models" in extra:
                kw["models"] = extra["models"]
            body = self.post_series(data, fields, 400, **kw)
            assert said in body["error"], (said, body)
        assert self.json_of("/api/series")["series"] == [] and self.json_of("/api/fits")["fits"] == []
        assert not list((self.data / "series").iterdir())  # nothing kept of a refused upload

    def test_a_sequence_given_orders_the_series(self) -> None:
        made = self.post_series(files(SERIES[:3]), {"generations": "2", "population": "6", "sequence": "30 10 20"})
        s = self.wait_done(made["id"])
        assert [(r["sequence"], r["file"]) for r in s["rows"]] == [
            (10.0, SERIES[1].name), (20.0, SERIES[2].name), (30.0, SERIES[0].name)]

    def test_a_restarted_web_process_takes_a_chain_up_where_it_stopped(self) -> None:
        made = self.post_series(files(SERIES[:3]), {"generations": "4", "population": "8", "chain": "yes"})
        sid = made["id"]

        async def restart() -> dict[str, Any]:
            deadline = time.monotonic() + 120
            while not self.series.series[sid].datasets[0].fit and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self.series.close()  # the web process stops with the chain under way
            await self.fits.close()
            fits = FitStore(self.data / "fits", self.client)
            again = SeriesStore(self.data / "series", fits)
            fits.load()
            assert again.load() == 1 and again.series[sid].state == "running"
            deadline = time.monotonic() + 300
            while again.series[sid].state != "done" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            body = again.json(again.series[sid])
            await again.close()
            await fits.close()
            return body

        s = self.io_loop.run_sync(restart, timeout=400)
        assert s["state"] == "done" and [r["state"] for r in s["rows"]] == ["done"] * 3, s["rows"]
        assert len({r["fit"] for r in s["rows"]}) == 3  # no dataset fitted twice
        record = json.loads((self.data / "series" / sid / "series.json").read_text())
        assert record["state"] == "done" and [d["fit"] for d in record["datasets"]] == [r["fit"] for r in s["rows"]]


class TestSeriesEdges(SeriesCase):
    def test_a_wide_series_keeps_a_window_of_fits_in_flight(self) -> None:
        from orchester.web import series as S

        seen: list[int] = []
        real = self.fits.add_member

        def counting(*a: Any, **kw: Any) -> Any:
            seen.append(sum(f.state in ("queued", "running") for f in self.fits.fits.values()))
            return real(*a, **kw)

        self.fits.add_member = counting  # type: ignore[method-assign]
        old, S.WINDOW = S.WINDOW, 2
        try:
            made = self.post_series(files(SERIES[:5]), {"generations": "2", "population": "6"})
            s = self.wait_done(made["id"])
        finally:
            S.WINDOW = old
        assert s["counts"]["done"] == 5 and len(seen) == 5 and max(seen) <= 2, seen

    def test_a_dataset_whose_fit_cannot_be_made_is_a_row_and_the_rest_complete(self) -> None:
        made = self.post_series(files(SERIES[:3]), {"generations": "2", "population": "6", "chain": "yes"})
        sid = made["id"]
        (self.data / "series" / sid / "data" / "1").unlink(missing_ok=True)  # its data file gone under it
        s = self.wait_done(sid)
        states = [r["state"] for r in s["rows"]]
        # (the first may have been submitted before the file went: done either way)
        assert states[0] == "done" and states[2] == "done", s["rows"]
        if states[1] == "failed":
            assert "could not be made" in s["rows"][1]["error"]

    def test_a_fit_forgotten_from_memory_is_read_back_not_fitted_again(self) -> None:
        made = self.post_series(files(SERIES[:2]), {"generations": "2", "population": "6", "chain": "yes"})
        sid = made["id"]
        s = self.wait_done(sid)
        first = s["rows"][0]["fit"]
        del self.fits.fits[first]  # as _trim would, past MAX_FITS
        assert self.fits.recall(first) is not None and self.fits.fits[first].state == "done"
        with pytest.raises(ValueError, match="exists already"):
            from orchester.genx.fits import FitSettings as FS

            folder = self.data / "series" / sid
            self.fits.add_member(sid, "x", "m.hgx", folder / "model.hgx", "d.dat", b"1", "default", 1.0, FS(), {},
                                 first)

    def test_dotted_names_give_distinct_fits(self) -> None:
        data = [("run.T300.5K.dat", SERIES[0].read_bytes()), ("run.T300.7K.dat", SERIES[1].read_bytes())]
        made = self.post_series(data, {"generations": "2", "population": "6"},
                                model=("film.v2.hgx", MODEL.read_bytes()))
        s = self.wait_done(made["id"])
        names = [self.json_of(f"/api/fits/{r['fit']}")["name"] for r in s["rows"]]
        assert names == ["film.v2_run.T300.5K", "film.v2_run.T300.7K"], names


def test_the_sequence_field() -> None:
    assert parse_sequence("", 3) is None and parse_sequence(" 1, 2.5 3e1 ", 3) == [1.0, 2.5, 30.0]
    from orchester.web.fits import SettingsError

    for bad in ("1, nan, 3", "1 2", "1 inf 2", "a b c"):
        with pytest.raises(SettingsError):
            parse_sequence(bad, 3)


def test_make_app_keeps_series_beside_the_fits(tmp_path: Path) -> None:
    from orchester.web.app import Auth

    fits = FitStore(tmp_path / "fits", object())  # type: ignore[arg-type]  (never asked: nothing is submitted)
    app = make_app(None, fits, Auth("t" * 32))  # type: ignore[arg-type]
    assert app.settings["series"].root == tmp_path / "series"
