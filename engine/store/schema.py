"""Importing this module registers every table with SQLModel.metadata."""

<<<<<<< HEAD
from engine.store import audit, models, poll_state, worklist  # noqa: F401
=======
from engine.store import models, steps, worklist  # noqa: F401
>>>>>>> h-mpps
