"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import audit, medrec, models, poll_state, worklist  # noqa: F401
