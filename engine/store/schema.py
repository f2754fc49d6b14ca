"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import audit, medrec, models, poll_state, steps, worklist  # noqa: F401
