"""The ``orchester`` command line: the group and the serving commands (``main``), the job commands
(``jobs``), what both command lines share (``common``), terminal rendering (``render``), ``top``,
the demo and batch scripts.
"""
