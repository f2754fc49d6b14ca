"""Importing this module registers every table with SQLModel.metadata."""

from engine.store import models  # noqa: F401

try:  # the worklist table lands with the worklist feature
    from engine.store import worklist  # noqa: F401
except ImportError:  # pragma: no cover
    pass
