"""One exception root: everything Orchester raises on purpose is an OrchesterError (issue 16)."""

from __future__ import annotations

from orchester.config import ConfigError
from orchester.errors import ClientClosed, OrchesterError, RemoteError, TaskFailed, Unreachable
from orchester.journal.folder import JournalError, UnsafeDirectoryError
from orchester.journal.manifest import ManifestError
from orchester.local.cluster import ClusterError
from orchester.security.keys import SecurityError


def test_every_orchester_exception_has_one_root_and_keeps_its_older_bases() -> None:
    for cls in (RemoteError, TaskFailed, Unreachable, ClientClosed, ConfigError, SecurityError, ClusterError,
                JournalError, UnsafeDirectoryError, ManifestError):
        assert issubclass(cls, OrchesterError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(ClusterError, RuntimeError)  # callers catch these
