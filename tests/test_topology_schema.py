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
    ({"liveness": "three"}, "wrong type"),
    ({"satellites": [], "clients": []}, "at least one"),
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
