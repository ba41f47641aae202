"""Metrics: counters and gauges collected in the process and sent to a Graphite carbon.
"""
