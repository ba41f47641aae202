"""The batch schedulers the autoscaler talks to: Slurm (``sbatch``, ``squeue``, ``scancel``) and PBS
(``qsub``, ``qstat``, ``qdel``), behind one small interface (:class:`Scheduler`).

Each adapter runs the scheduler's commands (``run``: :func:`run_command` by default; a test gives
recorded outputs) and reads their output into what the policy wants: a job's id, and the state of
each job *of this user* whose name is exactly the autoscaler's (``orchester-TAG``: ``pending``,
``running``; a job the scheduler no longer lists has ended). Another user's job of the same name
is never listed, so never adopted nor cancelled. A command that is missing, fails or times out is
a :class:`SchedulerError` in one line, naming the command; the autoscaler backs off and tries
again.
"""

from __future__ import annotations

import getpass
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from orchester.batch.policy import PENDING, RUNNING
from orchester.errors import OrchesterError

#: Seconds a scheduler command may take.
COMMAND_TIMEOUT = 60.0
#: A job name the autoscaler gives its jobs: this prefix, then its tag (letters, digits, ``-``, ``_``).
JOB_PREFIX = "orchester-"
TAG = re.compile(r"[A-Za-z0-9_-]{1,40}")


class SchedulerError(OrchesterError):
    """A scheduler command is missing, failed or timed out (the message is one line)."""


@dataclass(frozen=True)
class Output:
    """What a command printed, and its exit status."""

    returncode: int
    stdout: str
    stderr: str = ""


Runner = Callable[[list[str], str | None], Output]


def run_command(argv: list[str], stdin: str | None = None) -> Output:
    """Run ``argv`` (``stdin``: text to feed it) and return what it printed; :class:`SchedulerError` when the
    command is missing or takes longer than :data:`COMMAND_TIMEOUT` seconds."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]} not found: is the scheduler's client installed, and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{argv[0]} did not answer within {COMMAND_TIMEOUT:g} s") from None
    except OSError as exc:
        raise SchedulerError(f"{argv[0]} could not be run: {exc}") from None
    return Output(done.returncode, done.stdout, done.stderr)


def _checked(name: str, out: Output) -> str:
    if out.returncode != 0:
        said = [line.strip() for line in (out.stderr or out.stdout).splitlines() if line.strip()]
        raise SchedulerError(f"{name} failed (exit {out.returncode}): {said[-1][:300] if said else 'no message'}")
    return out.stdout


class Scheduler(Protocol):
    """What the autoscaler asks of a batch scheduler."""

    name: str

    def submit(self, script: str, tag: str) -> str:
        """Submit ``script`` as a job named for ``tag``; its job id."""

    def jobs(self, tag: str) -> dict[str, str]:
        """The jobs named for ``tag`` the scheduler lists, each ``pending`` or ``running``."""

    def cancel(self, job: str) -> None:
        """End job ``job``."""


def job_name(tag: str) -> str:
    """The name of the autoscaler's jobs for ``tag`` (checked: it goes on a command line)."""
    if not TAG.fullmatch(tag):
        raise ValueError(f"a tag is 1 to 40 letters, digits, '-' or '_', not {tag!r}")
    return JOB_PREFIX + tag


def current_user() -> str:
    """The user whose jobs the autoscaler lists (checked: it goes on a command line)."""
    user = getpass.getuser()
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]{0,63}", user):
        raise SchedulerError(f"cannot list the jobs of user {user!r}: not a user name the scheduler takes")
    return user


#: A job id as Slurm (``123``, ``123_4``) and PBS (``123.server.domain``) print it.
JOB_ID = re.compile(r"[0-9]{1,20}(?:[._][A-Za-z0-9.-]{1,100})?")


def _job_id(job: str) -> str:
    if not JOB_ID.fullmatch(job):
        raise ValueError(f"not a job id: {job!r}")
    return job


class Slurm:
    """Slurm: ``sbatch --parsable``, ``squeue --noheader``, ``scancel``."""

    name = "slurm"
    #: Slurm's job states that the policy counts as running; the states of a job that has ended; any other
    #: state squeue lists (pending, configuring, requeued or held, one it does not know yet) counts as
    #: pending: a job listed is never left out of ``max_jobs``
    RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                                "RESIZING"})
    ENDED_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                              "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED"})

    def __init__(self, run: Runner = run_command, user: Callable[[], str] = current_user) -> None:
        self.run = run
        self.user = user

    def submit(self, script: str, tag: str) -> str:
        """``sbatch --parsable --job-name orchester-TAG`` with the script on standard input."""
        out = _checked("sbatch", self.run(["sbatch", "--parsable", f"--job-name={job_name(tag)}"], script))
        first = out.strip().splitlines()[0] if out.strip() else ""
        job = first.split(";")[0]  # "<id>" or "<id>;<cluster>"
        if not JOB_ID.fullmatch(job):
            raise SchedulerError(f"sbatch printed no job id: {first[:200]!r}")
        return job

    def jobs(self, tag: str) -> dict[str, str]:
        """``squeue --noheader --user USER --name orchester-TAG --format %i|%T``: this user's jobs of that name."""
        out = _checked("squeue", self.run(["squeue", "--noheader", f"--user={self.user()}", f"--name={job_name(tag)}",
                                           "--format=%i|%T"], None))
        found: dict[str, str] = {}
        for line in out.splitlines():
            job, bar, state = line.strip().partition("|")
            job, state = job.strip(), state.strip()
            if not bar or not JOB_ID.fullmatch(job) or not state or state in self.ENDED_STATES:
                continue
            found[job] = RUNNING if state in self.RUNNING_STATES else PENDING
        return found

    def cancel(self, job: str) -> None:
        """``scancel JOB``."""
        _checked("scancel", self.run(["scancel", _job_id(job)], None))


class Pbs:
    """PBS (OpenPBS, PBS Pro, Torque): ``qsub -N``, ``qselect``, ``qdel``.

    ``qselect -u USER -N NAME -s STATES`` lists the ids of this user's jobs of exactly that name in
    those states, whole (``qstat``'s table cuts long ids and names, and lists every user's jobs).
    """

    name = "pbs"
    #: PBS job states (``qselect -s``): queued, held, waiting, transiting → pending; running, exiting,
    #: suspended → running; finished (F) and completed (C) are not asked for: ended
    PENDING_STATES = "QHWT"
    RUNNING_STATES = "RES"

    def __init__(self, run: Runner = run_command, user: Callable[[], str] = current_user) -> None:
        self.run = run
        self.user = user

    def submit(self, script: str, tag: str) -> str:
        """``qsub -N orchester-TAG`` with the script on standard input."""
        out = _checked("qsub", self.run(["qsub", "-N", job_name(tag)], script)).strip()
        job = out.splitlines()[-1].strip() if out else ""
        if not JOB_ID.fullmatch(job):
            raise SchedulerError(f"qsub printed no job id: {job[:200]!r}")
        return job

    def jobs(self, tag: str) -> dict[str, str]:
        """``qselect`` twice: this user's jobs named ``orchester-TAG``, pending and running."""
        name, user = job_name(tag), self.user()
        found: dict[str, str] = {}
        for states, kind in ((self.PENDING_STATES, PENDING), (self.RUNNING_STATES, RUNNING)):
            out = _checked("qselect", self.run(["qselect", "-u", user, "-N", name, "-s", states], None))
            for line in out.splitlines():
                job = line.strip()
                if JOB_ID.fullmatch(job):
                    found[job] = kind
        return found

    def cancel(self, job: str) -> None:
        """``qdel JOB``."""
        _checked("qdel", self.run(["qdel", _job_id(job)], None))


def scheduler(name: str, run: Runner = run_command) -> Scheduler:
    """The adapter named ``name``: ``slurm`` or ``pbs``."""
    if name == "slurm":
        return Slurm(run)
    if name == "pbs":
        return Pbs(run)
    raise ValueError(f"unknown scheduler {name!r}: slurm or pbs")
