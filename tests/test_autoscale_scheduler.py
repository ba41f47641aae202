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
        answer = self.answers.get(" ".join(argv)) or self.answers[argv[0]]  # a whole command line, or the command
        return answer


SQUEUE = """\
41|PENDING
42|RUNNING
43|COMPLETING
44|CONFIGURING
45|COMPLETED
46|CANCELLED
47|REQUEUE_HOLD
48|TIMEOUT
not a line
"""

#: ``qselect -u alice -N orchester-bus1 -s …`` on a PBS Pro server whose name is long: ids come whole
#: (``qstat``'s table would cut them to ``1234.pbs-serv*``)
QSELECT_PENDING = "1235.pbs-server-01.example.org\n1240.pbs-server-01.example.org\n"
QSELECT_RUNNING = "1234.pbs-server-01.example.org\n"


def test_slurm_submits_lists_its_users_jobs_and_cancels() -> None:
    run = Recorded({"sbatch": Output(0, "4242;cluster\n"), "squeue": Output(0, SQUEUE), "scancel": Output(0, "")})
    slurm = Slurm(run, user=lambda: "alice")
    assert slurm.submit("#!/bin/bash\nsatellite ...\n", "bus1") == "4242"
    assert run.calls[0] == (["sbatch", "--parsable", "--job-name=orchester-bus1"], "#!/bin/bash\nsatellite ...\n")
    # a held job (or one in a state this does not know) is listed, so counted: pending; ended states are not
    assert slurm.jobs("bus1") == {"41": PENDING, "42": RUNNING, "43": RUNNING, "44": PENDING, "47": PENDING}
    # only this user's jobs of exactly that name: another user's autoscaler with the same tag is not ours
    assert run.calls[1][0] == ["squeue", "--noheader", "--user=alice", "--name=orchester-bus1", "--format=%i|%T"]
    slurm.cancel("42")
    assert run.calls[2][0] == ["scancel", "42"]


def test_pbs_submits_lists_only_its_own_jobs_whole_and_cancels() -> None:
    run = Recorded({"qsub": Output(0, "1239.pbs-server-01.example.org\n"),
                    "qselect -u alice -N orchester-bus1 -s QHWT": Output(0, QSELECT_PENDING),
                    "qselect -u alice -N orchester-bus1 -s RES": Output(0, QSELECT_RUNNING), "qdel": Output(0, "")})
    pbs = Pbs(run, user=lambda: "alice")
    assert pbs.submit("#!/bin/bash\n", "bus1") == "1239.pbs-server-01.example.org"
    assert run.calls[0] == (["qsub", "-N", "orchester-bus1"], "#!/bin/bash\n")
    assert pbs.jobs("bus1") == {"1234.pbs-server-01.example.org": RUNNING, "1235.pbs-server-01.example.org": PENDING,
                                "1240.pbs-server-01.example.org": PENDING}
    pbs.cancel("1234.pbs-server-01.example.org")
    assert run.calls[-1][0] == ["qdel", "1234.pbs-server-01.example.org"]


def test_an_empty_answer_is_no_job_and_a_stray_line_is_ignored() -> None:
    run = Recorded({"qselect": Output(0, "qselect: warning: something\n\n"), "squeue": Output(0, "")})
    assert Pbs(run, user=lambda: "bob").jobs("t") == {} and Slurm(run, user=lambda: "bob").jobs("t") == {}


@pytest.mark.parametrize("adapter", [Slurm, Pbs])
def test_a_failing_command_is_one_line_naming_it(adapter: type) -> None:
    run = Recorded({name: Output(1, "", "sbatch: error: Batch job submission failed: Invalid account\n")
                    for name in ("sbatch", "squeue", "scancel", "qsub", "qselect", "qdel")})
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
