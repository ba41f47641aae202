"""The binary star: the pure state table (``star``), the peer link and its two roles (``pair``),
snapshot resynchronisation in slices (``resync``), and the requests a server that is not active
answers (``requests``).
"""
