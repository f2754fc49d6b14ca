"""The running engine: one store, one writer, the channels' sources, the delivery workers, the
DICOM SCP, the HTTP listener and the scheduled jobs, started and stopped together."""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from engine.dicom.adapter import DicomAdapter
from engine.fhir.adapter import FHIRAdapter
from engine.hl7.adapter import HL7Adapter
from engine.inputs import InputAdapter
from engine.runtime.cluster import Cluster
from engine.runtime.config import ChannelSpec, LoadedConfig
from engine.runtime.delivery import DeliveryWorker
from engine.runtime.destinations.base import QueuedDestination
from engine.runtime.http_app import HttpApp
from engine.runtime.pipeline import Pipeline
from engine.runtime.registry import Registry
from engine.runtime.sources.base import Endpoint, Source
from engine.store import crypto, queue
from engine.store.db import init_db, make_engine
from engine.store.writer import Writer

log = logging.getLogger(__name__)

# Each module registers its component(s) with `register(registry)`.
COMPONENT_MODULES = [
    "engine.runtime.sources.mllp",
    "engine.runtime.sources.http",
    "engine.runtime.sources.fhir_poll",
    "engine.runtime.sources.dicom",
    "engine.runtime.destinations.fhir",
    "engine.runtime.destinations.imagingstudy",
    "engine.runtime.destinations.file",
    "engine.runtime.destinations.mllp",
    "engine.runtime.destinations.worklist",
    "engine.runtime.destinations.medrec",
    "engine.runtime.destinations.steps",
]


# One adapter per input kind; each lives with its protocol (which may not import the runtime).
ADAPTERS: list[type[InputAdapter]] = [HL7Adapter, FHIRAdapter, DicomAdapter]


def default_registry() -> Registry:
    registry = Registry()
    for name in COMPONENT_MODULES:
        importlib.import_module(name).register(registry)
    for adapter in ADAPTERS:
        registry.add_adapter(adapter)
    return registry


@dataclass
class RunningChannel:
    spec: ChannelSpec
    pipeline: Pipeline
    source: Source
    worker: DeliveryWorker | None = None


@dataclass
class EngineApp:
    config: LoadedConfig
    registry: Registry
    db: Engine | None = None
    writer: Writer | None = None
    channels: dict[str, RunningChannel] = field(default_factory=dict)
    scp: Any = None
    scheduler: Any = None
    http: HttpApp | None = None
    cluster: Cluster | None = None

    async def start(self) -> None:
        cfg = self.config.engine
        st = cfg.storage
        if st.key or st.key_old or st.keyring:  # else the keyring the CLI (or the environment) set
            crypto.configure(crypto.Keyring.from_settings(st.key, st.key_old, st.keyring))
        self.db = make_engine(self.config.storage_url)
        await asyncio.to_thread(init_db, self.db)
        crypto.announce()  # once per start: encrypted at rest with key id ..., or PHI stored unencrypted
        self.cluster = Cluster(self.db, cfg.cluster)
        await self.cluster.join()  # refuses a store another process owns; queues a dead one's claims again
        self.writer = Writer(
            self.db, max_batch=cfg.storage.max_batch, dedupe_window=timedelta(hours=cfg.storage.dedupe_window_hours)
        )
        self.writer.start()
        policy = queue.RetryPolicy(
            cfg.delivery.max_attempts, cfg.delivery.backoff_base_seconds, cfg.delivery.backoff_cap_seconds
        )
        if cfg.http.enabled:
            self.http = HttpApp(cfg.http, self.db)
        for spec in self.config.channels:
            if spec.config.enabled:
                await self._start_channel(spec, policy)
        if self.http is not None:  # after the channels: their routes and read routers are known
            await self.http.start()
            log.info("HTTP listener on %s (channels: %s)", self.http.endpoint(), ", ".join(sorted(self.http.channels))
                     or "none")
        if cfg.dicom.enabled:
            self._start_scp()
        self._start_jobs()
        await self.cluster.announce([f"{what} {ep}" for what, ep in self.endpoints()])

    async def _start_channel(self, spec: ChannelSpec, policy: queue.RetryPolicy) -> None:
        assert self.writer is not None and self.db is not None and self.cluster is not None
        pipeline = Pipeline.build(spec, self.registry, self.writer, self.config.base_dir)
        for dest in pipeline.destinations:
            await dest.start()
        source = self.registry.build_source(spec.source, pipeline)
        name = spec.config.name
        if self.http is not None:
            for dest in pipeline.destinations:  # C6: read routes a destination serves (medication lists)
                router = getattr(dest, "http_router", None)
                if router is not None:
                    self.http.include(router(self.db, name))
            if hasattr(source, "bind_http"):
                source.bind_http(self.http, name)
        if hasattr(source, "bind_store"):  # a poller keeps its progress in the store
            source.bind_store(self.db, name)
        if hasattr(source, "bind_leader"):  # a poller polls from one node of a cluster
            source.bind_leader(self.cluster.leader_only)
        queued = {d.name: d for d in pipeline.destinations if isinstance(d, QueuedDestination)}
        worker = None
        if queued:
            worker = DeliveryWorker(
                self.db,
                spec.config.name,
                queued,
                policy,
                poll_interval=self.config.engine.delivery.poll_interval_seconds,
                owner=self.cluster.owner,
            )
            worker.start()
            pipeline.on_queued = worker.poke
        await source.start()
        self.channels[name] = RunningChannel(spec, pipeline, source, worker)
        if not getattr(source, "uses_http_app", False):  # HTTP channels are named when the listener is up
            for ep in source.endpoints():
                log.info("channel %s (%s) listening on %s", name, spec.input.type, ep)

    def _start_scp(self) -> None:
        from engine.dicom.scp import DicomApplication, DicomTimeouts, ServiceContext
        from engine.dicom.services import CHANNEL_SERVICES, DEFAULT_SERVICES, default_registry
        from engine.hl7.mllp import server_ssl_context  # plain TLS set-up, shared with MLLP
        from engine.runtime.sources.dicom import channel_submitter

        d = self.config.engine.dicom
        assert self.db is not None
        submit = channel_submitter({name: ch.source for name, ch in self.channels.items()})
        names = DEFAULT_SERVICES + (CHANNEL_SERVICES if submit is not None else ())  # MPPS only with its channel
        services = default_registry().build(names, ServiceContext(self.db, d.model_dump(), submit))
        tls = None
        if d.tls is not None:
            base = self.config.base_dir
            tls = server_ssl_context(
                str(base / d.tls.cert),
                str(base / d.tls.key),
                str(base / d.tls.ca) if d.tls.ca else None,
                d.tls.require_client_cert,
            )
        self.scp = DicomApplication(
            d.ae_title,
            d.host,
            d.port,
            services,
            allowed_callers=d.allowed_callers or None,
            check_called_aet=d.check_called_aet,
            max_associations=d.max_associations,
            max_associations_per_caller=d.max_associations_per_caller,
            timeouts=DicomTimeouts(d.idle_timeout_seconds, d.acse_timeout_seconds, d.dimse_timeout_seconds),
            tls=tls,
        )
        self.scp.start()  # logs its AE title, address and services

    def _start_jobs(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        from engine.runtime.jobs_worklist import purge_worklist

        assert self.cluster is not None
        w = self.config.engine.worklist
        self.scheduler = AsyncIOScheduler()
        leader_only = self.cluster.leader_only  # every node schedules a job; the leader runs it
        self.scheduler.add_job(
            asyncio.to_thread,
            "interval",
            minutes=w.purge_interval_minutes,
            id="worklist-purge",
            args=[leader_only("worklist-purge", purge_worklist), self.db, timedelta(hours=w.retention_hours),
                  timedelta(days=w.idle_days)],
            coalesce=True,
            max_instances=1,
        )
        self.cluster.add_jobs(self.scheduler, timedelta(hours=self.config.engine.storage.dedupe_window_hours))
        self._start_pacs_poll()
        self.scheduler.start()

    def _start_pacs_poll(self) -> None:
        """Only while the channel that takes FOUND units runs (and a poll interval is set)."""
        from zoneinfo import ZoneInfo

        from engine.dicom.pacs import make_pacs
        from engine.runtime.jobs_pacs import PacsPoll

        p, cfg = self.config.engine.pacs, self.config.engine
        channel = self.channels.get(p.channel)
        if channel is None or p.poll_minutes <= 0:
            return
        poll = PacsPoll(
            lambda: make_pacs(p.host, p.port, p.aet, p.qido_url, calling_aet=cfg.dicom.ae_title, timeout=p.timeout),
            channel.pipeline, days=p.poll_days, engine_aet=cfg.dicom.ae_title, tz=ZoneInfo(cfg.timezone),
            channel=p.channel,
        )
        assert self.cluster is not None
        self.scheduler.add_job(self.cluster.leader_only("pacs-poll", poll.run), "interval", minutes=p.poll_minutes,
                               id="pacs-poll", coalesce=True, max_instances=1)

    async def stop(self) -> None:
        if self.http is not None:  # first: requests in flight finish and are answered
            await self.http.stop()
            self.http = None
        for ch in self.channels.values():
            await ch.source.stop()
        for ch in self.channels.values():
            if ch.worker is not None:
                await ch.worker.stop()
            for dest in ch.pipeline.destinations:
                await dest.stop()
        self.channels = {}
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
            self.writer = None
        if self.cluster is not None:
            await self.cluster.leave()
        if self.db is not None:
            self.db.dispose()  # the engine stays usable for reading afterwards (tests, the CLI)

    def port_of(self, channel: str) -> int:
        """The first bound port of the channel's source (tests and the banner use it)."""
        return self.channels[channel].source.endpoints()[0].port

    def endpoints(self) -> list[tuple[str, Endpoint]]:
        """Every listener, for the start-up banner: (what, where). A channel without a listener of
        its own that takes what the DICOM SCP receives (MPPS) is shown on the SCP's endpoint."""
        found = [(name, ep) for name, ch in self.channels.items() for ep in ch.source.endpoints()]
        if self.scp is not None:
            d = self.config.engine.dicom
            scp = Endpoint("dicom", d.host, int(self.scp.port))
            found.append((f"DICOM {d.ae_title}", scp))
            found += [(f"{name} (MPPS on DICOM {d.ae_title})", scp) for name, ch in self.channels.items()
                      if getattr(ch.source, "served_by", "") == "dicom"]
        if self.http is not None:
            found.append(("HTTP (health)", self.http.endpoint()))
        return found
