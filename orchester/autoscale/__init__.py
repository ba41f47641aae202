"""The autoscaler: satellites asked of a batch scheduler when work waits, given back when idle.

:mod:`orchester.autoscale.policy` decides (pure: what the bus and the scheduler say, and the time,
in; jobs to submit, satellites to drain and jobs to cancel, out); :mod:`orchester.autoscale.scheduler`
runs the scheduler's commands (Slurm, PBS).
"""
