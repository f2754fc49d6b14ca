"""Scheduled worklist housekeeping (run by APScheduler in a worker thread)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import Engine

from engine.store.models import utcnow
from engine.store.worklist import purge

__all__ = ["purge_worklist"]

log = logging.getLogger(__name__)


def purge_worklist(engine: Engine, retention: timedelta, idle: timedelta) -> int:
    """Delete finished steps older than `retention` and SCHEDULED steps dated more than `idle` ago.

    Finished steps stay for `retention` so a modality that queried just before a cancel still finds
    the state; stale SCHEDULED steps (never performed, never cancelled by the RIS) would otherwise
    pile up and slow every broad query. Returns the number of rows deleted.
    """
    with engine.begin() as conn:
        count = purge(conn, utcnow(), retention, idle)
    if count:
        log.info("worklist purge: %d items deleted", count)
    return count
