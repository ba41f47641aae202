"""Build a topology of orchestrators, satellites, clients and faults, and measure routing choices.

This package is not imported by the rest of Orchester: the topology schema
(:mod:`topology_tests.schema`), the runner that starts a topology as real processes and
measures it (:mod:`topology_tests.runner`), and the report (:mod:`topology_tests.report`).
Run ``python -m topology_tests run topology_tests/examples/heterogeneous.toml
--strategy least_loaded,round_robin``.
"""

from .schema import ClientLoad, Fault, SatelliteGroup, Topology, TopologyError, from_dict, load

__all__ = ["ClientLoad", "Fault", "SatelliteGroup", "Topology", "TopologyError", "from_dict", "load"]
