"""The clients: the sans-I/O request and reply logic (``core``), the synchronous ``Client`` with its
I/O thread (``sync``), the ``AsyncClient`` (``aio``), and the event stream (``events``).
"""
