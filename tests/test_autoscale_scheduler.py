"""The scheduler adapters read what Slurm's and PBS's commands print (recorded outputs: no PBS server is
packaged for Debian, and these tests need none of them); a missing or failing command is one line."""

from __future__ import annotations

import pytest

from orchester.batch.policy import PENDING, RUNNING
from orchester.batch.scheduler import Output, Pbs, SchedulerError, Slurm, run_command, scheduler


class Recorded:
    """A scheduler's commands answered from a table of recorded outputs; every call is kept."""

    def __init__(self, answers: dict[str, Output]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: list[str], stdin: str | None) -> Output:
        self.calls.append((argv, stdin))
        return self.answers[argv[0]]


SQUEUE = """\
41|PENDING
42|RUNNING
43|COMPLETING
44|CONFIGURING
45|COMPLETED
46|CANCELLED
"""

QSTAT = """\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
1234.pbs-server   orchester-bus1   alice             00:00:01 R workq
1235.pbs-server   orchester-bus1   alice             0        Q workq
1236.pbs-server   other-job        alice             0        R workq
1237.pbs-server   orchester-bus1   alice             00:10:00 F workq
1238.pbs-server   orchester-bus2   alice             0        Q workq
"""


def test_slurm_submits_lists_and_cancels() -> None:
    run = Recorded({"sbatch": Output(0, "4242;cluster\n"), "squeue": Output(0, SQUEUE), "scancel": Output(0, "")})
    slurm = Slurm(run)
    assert slurm.submit("#!/bin/bash\nsatellite ...\n", "bus1") == "4242"
    assert run.calls[0] == (["sbatch", "--parsable", "--job-name=orchester-bus1"], "#!/bin/bash\nsatellite ...\n")
    assert slurm.jobs("bus1") == {"41": PENDING, "42": RUNNING, "43": RUNNING, "44": PENDING}
    assert run.calls[1][0] == ["squeue", "--noheader", "--name=orchester-bus1", "--format=%i|%T"]
    slurm.cancel("42")
    assert run.calls[2][0] == ["scancel", "42"]


def test_pbs_submits_lists_only_its_own_jobs_and_cancels() -> None:
    run = Recorded({"qsub": Output(0, "1239.pbs-server\n"), "qstat": Output(0, QSTAT), "qdel": Output(0, "")})
    pbs = Pbs(run)
    assert pbs.submit("#!/bin/bash\n", "bus1") == "1239.pbs-server"
    assert run.calls[0] == (["qsub", "-N", "orchester-bus1"], "#!/bin/bash\n")
    assert pbs.jobs("bus1") == {"1234.pbs-server": RUNNING, "1235.pbs-server": PENDING}
    pbs.cancel("1234.pbs-server")
    assert run.calls[-1][0] == ["qdel", "1234.pbs-server"]


@pytest.mark.parametrize("adapter", [Slurm, Pbs])
def test_a_failing_command_is_one_line_naming_it(adapter: type) -> None:
    run = Recorded({name: Output(1, "", "sbatch: error: Batch job submission failed: Invalid account\n")
                    for name in ("sbatch", "squeue", "scancel", "qsub", "qstat", "qdel")})
    with pytest.raises(SchedulerError) as err:
        adapter(run).submit("#!/bin/bash\n", "bus1")
    assert "failed (exit 1)" in str(err.value) and "Invalid account" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SchedulerError):
        adapter(Recorded({"sbatch": Output(0, "no id here"), "qsub": Output(0, "queue is full")})).submit("x", "t")


def test_a_missing_command_says_so() -> None:
    with pytest.raises(SchedulerError, match="not found"):
        run_command(["orchester-no-such-scheduler-command"])


def test_what_goes_on_a_command_line_is_checked() -> None:
    slurm = Slurm(Recorded({"scancel": Output(0, "")}))
    for bad in ("1; rm -rf /", "--all", ""):
        with pytest.raises(ValueError):
            slurm.cancel(bad)
    with pytest.raises(ValueError):
        slurm.jobs("bad tag")
    with pytest.raises(ValueError):
        scheduler("lsf")
