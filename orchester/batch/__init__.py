"""Batch schedulers: job scripts, the schedulers' commands, and the autoscaler.

:mod:`orchester.batch.scripts` renders batch scripts (a whole bus in one allocation, or satellite
jobs for a bus that runs elsewhere); :mod:`orchester.batch.scheduler` runs the scheduler's
commands (Slurm, PBS); :mod:`orchester.batch.policy` decides when to ask for satellite jobs and when
to give them back (pure: what the bus and the scheduler say, and the time, in; jobs to submit,
satellites to drain and jobs to cancel, out); :mod:`orchester.batch.autoscaler` carries the
decisions out.
"""
