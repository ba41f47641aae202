"""The orchestrator: its policy core (pure: messages in, frames and records out through an outbox),
the data it keeps (tasks, fleet, results, peers), routing, the release gate, restore, and the broker
that owns the sockets and the one poll loop.
"""
