"""The topology schema: TOML in, validated objects out, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from topology_tests import Topology, TopologyError, from_dict, load

GOOD = """
strategy = "round_robin"
heartbeat_interval = 0.25

[[satellites]]
count = 2
workers = 2
tags = ["fast"]

[[satellites]]
count = 1
speed = 0.25

[[clients]]
kind = "sleep"
tasks = 50
concurrency = 5

[[faults]]
at = 1.5
action = "kill"
satellite = 2
"""


def test_load_a_topology(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(GOOD)
    t = load(p)
    assert t.strategy == "round_robin" and t.satellite_count == 3
    assert t.satellites[1].speed == 0.25 and t.faults[0].satellite == 2
    assert Topology().validate().satellite_count == 2


@pytest.mark.parametrize("data,match", [
    ({"colour": 1}, "unknown field"),
    ({"satellites": {"count": 1}}, "array of tables"),
    ({"satellites": [{"count": 0}]}, r"satellites\[0\]"),
    ({"clients": [{"tasks": 0}]}, r"clients\[0\]"),
    ({"faults": [{"at": 1, "action": "explode"}]}, "action must be one of"),
    ({"faults": [{"at": 1, "action": "kill", "satellite": 9}]}, "out of range"),
    ({"faults": [{"action": "kill"}]}, "faults"),
    ({"liveness": "three"}, r"liveness must be an integer >= 1, not 'three'"),
    ({"orchestrators": 3}, "orchestrators must be 1 or 2"),
    ({"journal": "yes"}, "journal must be true or false"),
    ({"clients": [{"rate": -1}]}, r"clients\[0\].rate must be"),
    ({"faults": [{"at": 1, "action": "kill_orchestrator"}]}, "without a journal loses every task"),
    ({"satellites": [], "clients": []}, "at least one"),
    ({"satellites": []}, r"or \[elastic\]"),
    ({"elastic": {"max_jobs": 0}}, r"elastic.max_jobs must be an integer >= 1"),
    ({"elastic": {"min_jobs": 5, "max_jobs": 2}}, "min_jobs must be an integer from 0 to max_jobs"),
    ({"elastic": {"queue_delay": -1}}, "queue_delay"),
    ({"elastic": {"nodes": 2}}, r"elastic: unknown field"),
    ({"clients": [{"start": -2}]}, r"clients\[0\].start"),
])
def test_bad_topologies_name_the_field(data: dict, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        from_dict(data)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[satellites]\n")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load(bad)


def test_a_bad_field_in_a_file_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("strategy = 'least_loaded'\n\n[[satellites]]\ncount = 1\n\n[[satellites]]\n"
                   "workers = 2\ncount = 0\n\n[[clients]]\ntasks = 10\n")
    with pytest.raises(TopologyError, match=r"line 8: satellites\[1\].count must be an integer >= 1, not 0"):
        load(bad)
    bad.write_text("liveness = 0\n[[clients]]\ntasks = 1\n")
    with pytest.raises(TopologyError, match="line 1: liveness"):
        load(bad)
    bad.write_text("[[clients]]\ntasks = 1\ncolour = 'red'\n")
    with pytest.raises(TopologyError, match=r"line 3: clients\[0\]: unknown field"):
        load(bad)


def test_pairs_open_loops_and_journals_load() -> None:
    t = from_dict({"orchestrators": 2, "journal": True, "clients": [{"rate": 50.0, "tasks": 100}],
                   "faults": [{"at": 1.0, "action": "kill_orchestrator"},
                              {"at": 2.0, "action": "restart_orchestrator"}]})
    assert t.orchestrators == 2 and t.journal and t.clients[0].rate == 50.0 and len(t.faults) == 2


def test_an_elastic_topology_has_no_fixed_satellite_unless_it_declares_one() -> None:
    t = from_dict({"elastic": {"max_jobs": 3, "queue_delay": 0.5}, "clients": [{"tasks": 5, "start": 2.0}]})
    assert t.satellite_count == 0 and t.elastic is not None and t.elastic.max_jobs == 3
    assert t.clients[0].start == 2.0
    both = from_dict({"elastic": {}, "satellites": [{"count": 1}]})
    assert both.satellite_count == 1 and both.elastic is not None
