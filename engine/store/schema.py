"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import audit, dedupe, medrec, models, nodes, poll_state, steps, worklist  # noqa: F401
