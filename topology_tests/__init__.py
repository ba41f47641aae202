"""Build a topology of orchestrators, satellites, clients and faults, and measure routing choices.

This package is not imported by the rest of Orchester. It holds the topology
schema (:mod:`topology_tests.schema`); the launcher and report build on it.
"""

from .schema import ClientLoad, Fault, SatelliteGroup, Topology, TopologyError, from_dict, load

__all__ = ["ClientLoad", "Fault", "SatelliteGroup", "Topology", "TopologyError", "from_dict", "load"]
