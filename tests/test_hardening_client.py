"""Hardening (issue 14): routing strategies by allow-list (15), pickle needs every party's consent (17),
clients sanitise what peers send before they print it (11)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from orchester.config import ConfigError, OrchestratorConfig
from orchester.routing import LeastLoaded, TagAffinity, make_strategy

# ------------------------------------------------------------------ 15: routing strategies


class Recorder:
    """A zero-argument callable that records each call (what ``sys:exit`` was to the old code)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """A module ``h14probe`` with a recording callable, a strategy class and a class without choose."""
    mod = types.ModuleType("h14probe")
    mod.boom = Recorder()  # type: ignore[attr-defined]
    built: list[object] = []

    class Strategy:
        def __init__(self) -> None:
            built.append(self)

        def choose(self, task: Any, candidates: Any) -> Any:
            return candidates[0]

    class NoChoose:
        def __init__(self) -> None:
            built.append(self)

    class Explodes:
        def __init__(self) -> None:
            raise RuntimeError("no")

        def choose(self, task: Any, candidates: Any) -> Any:
            return candidates[0]

    mod.Strategy, mod.NoChoose, mod.Explodes, mod.built = Strategy, NoChoose, Explodes, built  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "h14probe", mod)
    yield mod


def test_sys_exit_is_refused_and_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    exit_calls = Recorder()
    monkeypatch.setattr(sys, "exit", exit_calls)
    with pytest.raises(ValueError, match="not allowed"):
        make_strategy("sys:exit")
    with pytest.raises(ValueError, match="not a class"):  # even when an operator allowed it by mistake
        make_strategy("sys:exit", allowed=["sys:exit"])
    assert exit_calls.calls == 0


def test_a_path_off_the_allow_list_is_not_imported_nor_called(probe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not allowed.*--allow-strategy h14probe:boom"):
        make_strategy("h14probe:boom")
    with pytest.raises(ValueError, match="not allowed"):
        make_strategy("h14probe:Strategy", allowed=["h14probe:Other"])
    imported: list[str] = []
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))
    with pytest.raises(ValueError, match="not allowed"):
        make_strategy("antigravity:Anything")
    assert probe.boom.calls == 0 and probe.built == [] and imported == []


def test_an_allowed_path_must_name_a_strategy_class_checked_before_it_is_built(probe: Any) -> None:
    with pytest.raises(ValueError, match="is a Recorder, not a class"):
        make_strategy("h14probe:boom", allowed=["h14probe:boom"])
    with pytest.raises(ValueError, match="without a choose"):
        make_strategy("h14probe:NoChoose", allowed=["h14probe:NoChoose"])
    assert probe.boom.calls == 0 and probe.built == []
    with pytest.raises(ValueError, match="cannot instantiate.*RuntimeError: no"):
        make_strategy("h14probe:Explodes", allowed=["h14probe:Explodes"])
    with pytest.raises(ValueError, match="cannot import"):
        make_strategy("h14probe:Missing", allowed=["h14probe:Missing"])
    s = make_strategy("h14probe:Strategy", allowed=["h14probe:Strategy"])
    assert s.name == "h14probe:Strategy" and probe.built == [s]


def test_builtins_are_always_allowed_and_bad_names_are_refused() -> None:
    assert isinstance(make_strategy("least_loaded"), LeastLoaded)
    assert isinstance(make_strategy("orchester.routing:TagAffinity"), TagAffinity)
    for bad in ("nope", "os.system", ":x", "a:b:c", "a b:C", "mod:Class()", "x" * 10_000):
        with pytest.raises(ValueError, match="unknown routing strategy"):
            make_strategy(bad, allowed=[bad])
    with pytest.raises(ValueError):
        make_strategy(12, allowed=[12])  # type: ignore[arg-type, list-item]


def test_the_config_allows_its_start_strategy_and_the_listed_ones() -> None:
    cfg = OrchestratorConfig(strategy="mylab.routing:A", strategies=["mylab.routing:B"]).validate()
    assert cfg.allowed_strategies == {"mylab.routing:A", "mylab.routing:B"}
    assert OrchestratorConfig().validate().allowed_strategies == {"least_loaded"}
    for bad in ({"strategy": "sys.exit"}, {"strategies": ["os:system()"]}, {"strategies": "mylab:A"}):
        with pytest.raises(ConfigError):
            OrchestratorConfig(**bad).validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------ 17: pickle needs every party's consent

def _hit() -> str:
    """What a pickle payload calls on load (records the call)."""
    HITS.append(1)
    return "ran"


HITS: list[int] = []


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_hit, ())


@pytest.fixture
def pickle_on() -> Iterator[None]:
    """This process allows pickle (as a worker of ``satellite run --allow-pickle`` does)."""
    from serializers import codecs

    HITS.clear()
    codecs.allow_pickle(True)
    yield
    codecs.allow_pickle(False)


def _run(task_header: dict[str, Any], body: bytes, dispatch: dict[str, Any]) -> dict[str, Any]:
    import satellites.builtins  # noqa: F401  (registers echo)
    from satellites.worker import run_task
    from serializers import pack, unpack

    out = run_task([pack({"id": "t-1", "a": 1, **dispatch}), pack(task_header), body], "sat-1", lambda h: None)
    return unpack(out[0])


def test_the_orchestrator_accepts_pickle_submits_only_when_started_with_allow_pickle() -> None:
    from serializers import ProtocolError, check_submit_codec, dispatch_consent
    from serializers import protocol as P

    assert check_submit_codec({"id": "x"}, allow_pickle=False) == "msgpack"
    assert check_submit_codec({"c": "json"}, allow_pickle=False) == "json"
    with pytest.raises(ProtocolError) as e:
        check_submit_codec({"c": "pickle"}, allow_pickle=False)
    assert e.value.code == P.E_CODEC and "--allow-pickle" in e.value.detail
    assert check_submit_codec({"c": "pickle"}, allow_pickle=True) == "pickle"
    with pytest.raises(ProtocolError) as e:  # CurveZMQ: the key needs the pickle role too
        check_submit_codec({"c": "pickle"}, allow_pickle=True, roles={"submit"})
    assert e.value.code == P.E_FORBIDDEN
    assert check_submit_codec({"c": "pickle"}, allow_pickle=True, roles={"submit", "pickle"}) == "pickle"
    for bad in (5, None, "", "x" * 65, ["pickle"]):
        with pytest.raises(ProtocolError) as e:
            check_submit_codec({"c": bad}, allow_pickle=True)
        assert e.value.code == P.E_MALFORMED
    assert dispatch_consent(False) == {} and dispatch_consent(True) == {"pk": True}


def test_a_satellite_allowing_pickle_refuses_a_pickle_task_the_orchestrator_did_not_accept(pickle_on: None) -> None:
    import pickle

    from serializers import ERR_CODEC_REFUSED

    body = pickle.dumps([[_Evil()], {}])
    r = _run({"k": "echo", "c": "pickle"}, body, {})
    assert r["ok"] is False and r["err"]["type"] == ERR_CODEC_REFUSED
    assert "orchestrator did not accept pickle" in r["err"]["msg"] and HITS == []
    r = _run({"k": "echo", "c": "pickle"}, body, {"pk": 1})  # consent is exactly True
    assert r["err"]["type"] == ERR_CODEC_REFUSED and HITS == []
    for codec in ("msgpack", "json"):  # never guessed from the bytes
        r = _run({"k": "echo", "c": codec}, body, {"pk": True})
        assert r["ok"] is False and HITS == []
    r = _run({"k": "echo", "c": "pickle"}, body, {"pk": True})  # every party agreed: it runs
    assert r["ok"] is True and HITS == [1]


def test_a_satellite_without_allow_pickle_refuses_even_with_the_orchestrators_consent() -> None:
    import pickle

    from serializers import ERR_CODEC_REFUSED, check_run_codec, codecs

    HITS.clear()
    assert not codecs.pickle_allowed()
    r = _run({"k": "echo", "c": "pickle"}, pickle.dumps([[_Evil()], {}]), {"pk": True})
    assert r["err"]["type"] == ERR_CODEC_REFUSED and "satellite run --allow-pickle" in r["err"]["msg"]
    assert HITS == []
    assert check_run_codec({"c": "pickle"}, {"pk": True}, allow_pickle=True) == "pickle"
    assert check_run_codec({}, {}) == "msgpack"
