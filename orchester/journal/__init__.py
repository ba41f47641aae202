"""The journal: checksummed log segments (``wal``), the group-commit and history threads
(``writer``), PyTables compaction and reads (``segments``), the task history rows (``history``).
"""
