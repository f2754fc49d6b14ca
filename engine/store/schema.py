"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import medrec, models, worklist  # noqa: F401
