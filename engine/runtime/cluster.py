"""This engine process as a node of its store: the start-up check, the heartbeat, the leader.

Outside cluster mode (ENGINE_CLUSTER=false, the default) the process must be the store's only one
(`StoreLock`), and claims left `doing` can only be a dead predecessor's: they are queued again at
start. In cluster mode (PostgreSQL only) the process registers as a node, renews its heartbeat, and
competes for the scheduler lease: scheduled jobs wrapped in `leader_only` run on one node at a time,
and the lease moves to a live node within `lease_seconds` of the leader's death. On SQLite the one
process is always the leader.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from engine.runtime.config import ClusterConfig
from engine.store import nodes, queue

__all__ = ["Cluster", "ClusterError"]

log = logging.getLogger(__name__)



class ClusterError(Exception):
    """The process may not start on this store (the message says why and what to do)."""


def default_node_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Cluster:
    def __init__(self, db: Engine, config: ClusterConfig) -> None:
        self.db = db
        self.config = config
        self.enabled = config.enabled
        self.name = config.node_name or default_node_name()
        self.lease = timedelta(seconds=config.lease_seconds)
        self.owner = queue.Owner(self.name, self.lease)
        self._lock = nodes.StoreLock(db, shared=config.enabled)
        self._leader_until = 0.0  # monotonic time until which this node may act as leader
        self._task: asyncio.Task[None] | None = None
        self._joined = False

    # -- start and stop ----------------------------------------------------------------------
    async def join(self) -> None:
        """Refuse to start when the store is another process's, else register and start beating."""
        if self.enabled and self.db.dialect.name != "postgresql":
            raise ClusterError(
                "cluster mode (ENGINE_CLUSTER=true) needs a PostgreSQL store (ENGINE_STORAGE_URL="
                "postgresql+psycopg://...); a SQLite store serves one process"
            )
        try:
            await asyncio.to_thread(self._lock.acquire)
            await asyncio.to_thread(
                nodes.register, self.db, self.name, host=socket.gethostname(), pid=os.getpid(),
                cluster=self.enabled, stale_after=self.lease,
            )
        except (nodes.StoreInUse, nodes.NodeInUse) as exc:
            await asyncio.to_thread(self._lock.release)
            raise ClusterError(str(exc)) from None
        self._joined = True
        if not self.enabled:  # the store's only process: whatever is in flight was a dead one's
            await asyncio.to_thread(nodes.forget_others, self.db, self.name)
            released = await asyncio.to_thread(queue.release_claims, self.db)
        else:  # claims under this node's name are from its previous life (the name is not live)
            released = await asyncio.to_thread(
                queue.release_claims, self.db, node=self.name, reason=f"resent: node {self.name} restarted"
            )
        if released:
            log.warning("%d deliveries in flight when the engine last stopped are queued again", released)
        await asyncio.to_thread(self._beat)
        log.info("node %s joined the store%s%s", self.name, " in cluster mode" if self.enabled else "",
                 " as leader" if self.is_leader else "")
        self._task = asyncio.create_task(self._run(), name="cluster-heartbeat")

    async def announce(self, listeners: list[str]) -> None:
        """The listeners `engine status` shows for this node."""
        if self._joined:
            await asyncio.to_thread(nodes.set_listeners, self.db, self.name, listeners)

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._joined:
            self._leader_until = 0.0
            try:
                await asyncio.to_thread(nodes.leave, self.db, self.name)
            except Exception as exc:  # the store is gone: the row lapses by itself
                log.warning("node %s could not sign off (%s)", self.name, type(exc).__name__)
            self._joined = False
        await asyncio.to_thread(self._lock.release)

    # -- the heartbeat and the leader ---------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await asyncio.to_thread(self._beat)
            except Exception as exc:
                log.warning("node %s heartbeat failed (%s); retrying", self.name, type(exc).__name__)

    def _beat(self) -> None:
        started = time.monotonic()
        nodes.heartbeat(self.db, self.name)
        was = self.is_leader
        if nodes.acquire_lease(self.db, nodes.LEADER, self.name, self.lease):
            # valid here a little less long than in the database: another node waits for the latter
            self._leader_until = started + self.lease.total_seconds() - self.config.heartbeat_seconds / 2
            if not was:
                log.info("node %s is now the leader (runs the scheduled jobs)", self.name)
        else:
            self._leader_until = 0.0
            if was:
                log.warning("node %s is no longer the leader", self.name)

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._leader_until

    def leader_only(self, job: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` (a function or a coroutine function) wrapped to run only while this node leads:
        every node schedules the job, the leader runs it."""
        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                if self._may_run(job):
                    return await fn(*args, **kwargs)
                return None

            return run_async

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs) if self._may_run(job) else None

        return run

    def _may_run(self, job: str) -> bool:
        if not self.is_leader:
            log.debug("job %s skipped: node %s is not the leader", job, self.name)
            return False
        log.info("job %s runs on node %s (leader)", job, self.name)
        return True

    def add_jobs(self, scheduler: Any, dedupe_window: timedelta) -> None:
        """The store's own housekeeping, on the leader: dedupe keys older than the window go."""
        scheduler.add_job(
            asyncio.to_thread,
            "interval",
            minutes=60,
            id="dedupe-keys-purge",
            args=[self.leader_only("dedupe-keys-purge", _purge_keys), self.db, dedupe_window],
            coalesce=True,
            max_instances=1,
        )


def _purge_keys(db: Engine, window: timedelta) -> int:
    from engine.store import dedupe
    from engine.store.models import utcnow

    with db.begin() as conn:
        return dedupe.purge_expired(conn, utcnow() - window)
