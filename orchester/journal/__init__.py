"""The journal: the records (``records``), the private folder (``folder``), checksummed log
segments (``wal``), the group-commit and history threads (``writer``); HDF5 segments: their
names and manifest (``manifest``), the file itself (``hdf5``), compaction, checked reads and
retention (``segments``), reading a damaged one in a separate process (``child``) and the
recovery at start (``recovery``); the task history rows (``history``), the history index
(``index``) and the process that keeps it (``historian``).
"""
