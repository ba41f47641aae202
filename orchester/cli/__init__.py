"""The ``orchester`` command line: the group (``main``), one module per command family (``serve``,
``keys``, ``tasks``, ``control``, ``fit``, ``history``, ``journal``, ``cluster``, ``top``, ``demo``),
what they share (``common``), and the batch scripts (``scripts``).
"""
