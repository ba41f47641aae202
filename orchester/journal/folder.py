"""The journal's folder: private to the user that runs the orchestrator, its lock, durable entries.

The journal holds payloads and results in the clear, so it is private to that user:
:func:`private_directory` creates the folder 0700 (whatever the umask) and refuses one that
another user owns or that group or others can write; every file in it (log segments, HDF5
segments and their temporary files, the manifest, the lock) is created 0600 through
:func:`open_private`. A folder left readable by an older version is tightened, with a
warning. The fit cache keeps its folder private the same way.

Two processes cannot write one journal: the writer holds an exclusive ``flock`` on
``DIR/LOCK`` (:func:`open_lock`) for its lifetime. :func:`fsync_directory` makes the folder's
entries durable after a file is created, renamed or removed.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from orchester.errors import OrchesterError

#: Mode of the journal folder (and of the fit cache's): the owner's alone.
DIR_MODE = 0o700
#: Mode of every file in it.
FILE_MODE = 0o600


class JournalError(OrchesterError):
    """A journal that cannot be used (locked by another process, unreadable folder)."""


class UnsafeDirectoryError(JournalError):
    """A folder that must be private is not: another user owns it, or others can write into it."""


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


#: The names a journal folder holds (anything else in it is left alone, never re-moded).
JOURNAL_NAMES = re.compile(r"(LOCK|MANIFEST|wal-\d+\.log|pay-\d+\.log|seg-\d+\.h5)(\..*)?|\..*\.tmp")


def private_directory(directory: str | os.PathLike[str], what: str = "journal",
                      names: re.Pattern[str] | None = JOURNAL_NAMES) -> tuple[int, int]:
    """Create ``directory`` 0700, or check an existing one and make it private.

    Refuses (:class:`UnsafeDirectoryError`) a folder that is a symbolic link, that another uid
    owns, that group or others can write, or that holds anything another uid owns (it could
    have been planted while the folder was open). A folder that group or others can merely
    read or enter (as an older version left it) is set to 0700, and its own entries (those
    whose top-level name matches ``names``; ``None``: all) lose their group and other bits —
    nothing else of theirs changes, and nothing else in the folder is touched (a journal
    pointed at a home folder by mistake does not re-mode it). Returns the folder's mode before
    and the number of entries tightened; the caller warns when either was loose. ``what``
    names the folder in messages.
    """
    d = Path(directory)
    if d.is_symlink():
        raise UnsafeDirectoryError(f"{what} {d} is a symbolic link: refusing it (give the real folder)")
    created = False
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(d, DIR_MODE)
        created = True
    except FileExistsError:  # an existing folder: checked below
        created = False
    except OSError as exc:
        raise JournalError(f"{what} {d}: cannot create it: {exc.strerror}") from None
    try:
        st = os.stat(d)
    except OSError as exc:
        raise JournalError(f"{what} {d}: {exc.strerror}") from None
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise JournalError(f"{what} {d} is not a directory")
    if st.st_uid != uid:
        raise UnsafeDirectoryError(f"{what} {d} is owned by uid {st.st_uid}, not by this user (uid {uid}): "
                                   f"refusing it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafeDirectoryError(f"{what} {d} is writable by {_who(mode)} (mode {mode:04o}): refusing it; "
                                   f"check its files, then chmod 700 it")
    tightened = 0
    for root, dirs, files in os.walk(d):
        if root == str(d) and names is not None:  # only the folder's own entries, and what is below them
            dirs[:] = [n for n in dirs if names.fullmatch(n)]
            files = [n for n in files if names.fullmatch(n)]
        for name in dirs + files:
            path = os.path.join(root, name)
            est = os.lstat(path)
            if est.st_uid != uid:
                raise UnsafeDirectoryError(f"{what} {d} holds {os.path.relpath(path, d)}, owned by uid "
                                           f"{est.st_uid}, not by this user (uid {uid}): refusing it")
            emode = stat.S_IMODE(est.st_mode)
            if stat.S_ISDIR(est.st_mode):
                if emode & 0o022:
                    raise UnsafeDirectoryError(f"{what} {d} holds the folder {os.path.relpath(path, d)}, "
                                               f"writable by {_who(emode)} (mode {emode:04o}): refusing it")
                if emode & 0o077:
                    os.chmod(path, emode & 0o700)
                    tightened += 1
            elif stat.S_ISREG(est.st_mode) and emode & 0o077:
                os.chmod(path, emode & 0o700)  # group and other bits go; the owner's stay (+x too)
                tightened += 1
    if created or mode != DIR_MODE:
        os.chmod(d, DIR_MODE)  # exactly 0700, whatever the umask took away
    return mode, tightened


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` a file 0600 whatever the umask (created so, or set so if it exists); never a symlink."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_lock(directory: str | os.PathLike[str]) -> int:
    """Open (create 0600) the journal's ``LOCK`` file and return its descriptor, not yet locked.

    The lock lives in the private folder: no other user can open it, so none can hold it.
    """
    path = Path(directory) / "LOCK"
    try:
        return open_private(path, os.O_RDWR)
    except OSError as exc:
        raise JournalError(f"journal {directory}: cannot open {path.name}: {exc.strerror}") from None


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the directory's entries (files created, renamed or removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
