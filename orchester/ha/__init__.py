"""The binary star: the pure state table (``star``), the peer link's messages (``link``), the
active's replication out (``leader``) and the passive's replication in (``follower``), snapshot
resynchronisation in slices (``resync``), the requests a server that is not active answers
(``requests``), and the adapter that owns the sockets and the current role (``pair``).
"""
