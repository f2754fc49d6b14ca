"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import audit, models, poll_state, steps, worklist  # noqa: F401
