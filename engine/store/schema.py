"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import dedupe, models, nodes, worklist  # noqa: F401
