"""Processes on this machine: ``LocalCluster`` (an orchestrator and satellites) and ``LocalPair``
(a binary star), with the signal handling that stops every child they started.
"""
