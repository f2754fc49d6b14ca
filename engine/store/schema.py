"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import models, steps, worklist  # noqa: F401
