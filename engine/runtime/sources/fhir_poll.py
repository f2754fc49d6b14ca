"""The `fhir-poll` source: pull medication resources from the EMR's FHIR server on a schedule.

Each run asks, per resource type, only for what can matter to a look-back window: the first run
(no watermark yet) uses the window queries (`authoredon=ge<today-window>`, `whenhandedover=ge...`,
`effective=ge...`, and `status=active` for what counts whatever its date); later runs ask for
what changed since the last complete run (`_lastUpdated=ge<watermark>`), so a request stopped
today is seen even though it was authored long ago. Per patient when a list is configured. Pages
are followed by `Bundle.link[next]`. Every resource goes through the channel's pipeline exactly as
a posted one (stored as received, validated, deduped by Type/id + content digest: polling the same
version again is a duplicate, so runs may overlap safely). Progress is kept in `poll_state`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import httpx
from pydantic import Field, field_validator, model_validator
from sqlalchemy import Engine

from engine.fhir.client import FHIR_JSON, Auth, AuthConfig, AuthError
from engine.runtime.registry import Registry
from engine.runtime.sources.base import Endpoint, Receiver, SourceConfig
from engine.store import poll_state
from engine.store.models import MessageStatus

log = logging.getLogger(__name__)

# search parameters (FHIR R4) that bound each type to the window; `{start}` is the window's first day
WINDOW_QUERIES: dict[str, list[str]] = {
    "MedicationRequest": ["authoredon=ge{start}", "status=active,on-hold"],
    "MedicationDispense": ["whenhandedover=ge{start}"],
    "MedicationAdministration": ["effective-time=ge{start}"],
    "MedicationStatement": ["effective=ge{start}", "status=active,intended"],
}
# the watermark is set this far before the run began, by the server's clock (its Date header) when
# it gives one: commits on the server still in flight when the search ran are asked for again
OVERLAP = timedelta(minutes=2)


class FhirPollConfig(SourceConfig):
    type: str = "fhir-poll"
    base_url: str
    auth: AuthConfig = AuthConfig()
    resources: list[str] = list(WINDOW_QUERIES)
    queries: dict[str, list[str]] = {}  # per type, instead of WINDOW_QUERIES' entry
    patients: list[str] = []  # patient ids (search `patient=`); empty: every patient, by change since the last run
    window_days: int = Field(100, ge=1)
    timezone: str = "UTC"  # the calendar the window's days are counted in
    interval_seconds: float = Field(900.0, gt=0)
    page_size: int = Field(100, ge=1, le=1000)
    max_pages: int = Field(1000, ge=1)  # per query and run: a runaway `next` chain stops here
    timeout: float = Field(30.0, gt=0)
    verify_tls: bool = True

    @field_validator("resources")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in WINDOW_QUERIES]
        if unknown:
            known = ", ".join(WINDOW_QUERIES)
            raise ValueError(f"not a medication resource type: {', '.join(unknown)} (one of {known})")
        return value

    @model_validator(mode="after")
    def _queries_fit(self) -> FhirPollConfig:
        for rtype, templates in self.queries.items():
            if rtype not in self.resources:
                raise ValueError(f"queries.{rtype}: not among the polled resources")
            for template in templates:
                try:
                    template.format(start="2000-01-01")
                except (KeyError, IndexError, ValueError):
                    raise ValueError(f"queries.{rtype}: a template may use only {{start}}") from None
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (KeyError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Europe/Berlin)") from None
        return value

    def endpoints(self) -> list[Endpoint]:
        return []  # it listens nowhere


class FhirPollSource:
    Config: ClassVar[type[SourceConfig]] = FhirPollConfig
    default_input: ClassVar[str] = "fhir"

    def __init__(self, config: SourceConfig, receiver: Receiver) -> None:
        assert isinstance(config, FhirPollConfig)
        self.config = config
        self.receiver = receiver
        self.auth = Auth(config.auth)
        self.db: Engine | None = None
        self.channel = ""
        self.client: httpx.AsyncClient | None = None
        self.scheduler: Any = None
        self._scheduled: Any = None  # run_once as the app wraps it (bind_leader)
        self._lock = asyncio.Lock()

    def bind_store(self, db: Engine, channel: str) -> None:
        self.db, self.channel = db, channel

    def bind_leader(self, leader_only: Callable[[str, Any], Any]) -> None:
        """With several engine nodes, the scheduled run happens on the leader only (run_once does not ask)."""
        self._scheduled = leader_only(f"fhir-poll {self.channel}", self.run_once)

    def endpoints(self) -> list[Endpoint]:
        return []

    async def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.client = httpx.AsyncClient(timeout=self.config.timeout, verify=self.config.verify_tls,
                                        headers={"Accept": FHIR_JSON})
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.scheduler.add_job(self._scheduled or self.run_once, "interval", seconds=self.config.interval_seconds,
                               id=f"poll-{id(self)}",
                               next_run_time=datetime.now(UTC), coalesce=True, max_instances=1)
        self.scheduler.start()

    async def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        async with self._lock:  # a run in progress finishes its page
            if self.client is not None:
                await self.client.aclose()
                self.client = None

    # -- one run -----------------------------------------------------------------------------
    async def run_once(self) -> dict[str, int]:
        """Poll every configured type once; returns new units per type (tests call it directly)."""
        async with self._lock:
            if self.client is None:
                return {}
            states = {}
            if self.db is not None:
                rows = await asyncio.to_thread(poll_state.load_states, self.db, self.channel)
                states = {r["resource_type"]: r for r in rows}
            counts = {}
            for rtype in self.config.resources:
                since = str(states.get(rtype, {}).get("since") or "")
                counts[rtype] = await self._poll_type(rtype, since)
            return counts

    def _searches(self, rtype: str, since: str, today: datetime) -> list[dict[str, str]]:
        cfg = self.config
        if since:
            base = [{"_lastUpdated": f"ge{since}"}]
        else:
            start = (today - timedelta(days=cfg.window_days)).date().isoformat()
            templates = cfg.queries.get(rtype, WINDOW_QUERIES.get(rtype, [""]))
            base = []
            for template in templates:
                params: dict[str, str] = {}
                for part in filter(None, template.format(start=start).split("&")):
                    key, _, value = part.partition("=")
                    params[key] = value
                base.append(params)
        searches = []
        for params in base:
            params = {**params, "_count": str(cfg.page_size)}
            if cfg.patients:
                searches += [{**params, "patient": p} for p in cfg.patients]
            else:
                searches.append(params)
        return searches

    async def _poll_type(self, rtype: str, since: str) -> int:
        began: datetime | None = None  # the server's time of the first search, else ours
        today = datetime.now(ZoneInfo(self.config.timezone))
        fetched = stored = pages = 0
        error = ""
        try:
            for params in self._searches(rtype, since, today):
                url: str | None = f"{self.config.base_url.rstrip('/')}/{rtype}"
                query: dict[str, str] | None = params
                for _ in range(self.config.max_pages):
                    if url is None:
                        break
                    bundle, served = await self._get(url, query)
                    began = began or served
                    pages += 1
                    resources = [e["resource"] for e in bundle.get("entry") or []
                                 if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
                    fetched += len(resources)
                    stored += await self._hand_over(resources)
                    url, query = _next_link(bundle, self.config.base_url), None
        except PollError as exc:
            error = str(exc)
            log.warning("channel=%s poll of %s failed: %s", self.channel, rtype, error)
        except Exception as exc:  # the store (or a bug): its text can quote a resource (PHI), so the type only
            error = type(exc).__name__
            log.error("channel=%s poll of %s failed: %s", self.channel, rtype, error)
        watermark = None if error else ((began or today) - OVERLAP).astimezone(UTC).isoformat(timespec="seconds")
        if self.db is not None:
            await asyncio.to_thread(poll_state.record_run, self.db, self.channel, rtype, since=watermark,
                                    fetched=fetched, stored=stored, pages=pages, error=error)
        log.info("channel=%s polled %s: %d fetched, %d new, %d page(s)%s", self.channel, rtype, fetched, stored,
                 pages, f", failed: {error}" if error else "")
        return stored

    async def _get(self, url: str, params: dict[str, str] | None) -> tuple[dict[str, Any], datetime]:
        """The search page, and when the server answered it (its Date header, else our clock)."""
        asked = datetime.now(UTC)
        assert self.client is not None
        for attempt in (1, 2):
            try:
                headers = await self.auth.headers(self.client)
                resp = await self.client.get(url, params=params, headers=headers)
            except AuthError as exc:
                raise PollError(f"authentication: {exc}") from None
            except httpx.HTTPError as exc:
                raise PollError(type(exc).__name__) from None
            if resp.status_code == 401 and attempt == 1 and self.auth.refused():
                continue  # a cached OAuth2 token expired early: one more try with a fresh one
            if resp.status_code != 200:
                raise PollError(f"HTTP {resp.status_code}")
            try:
                body = resp.json()
            except ValueError:
                raise PollError("the answer is not JSON") from None
            if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
                raise PollError("the answer is not a Bundle")
            return body, _server_time(resp.headers.get("date"), asked)
        raise PollError("HTTP 401")

    async def _hand_over(self, resources: list[dict[str, Any]]) -> int:
        """One page through the pipeline together (one group commit); returns the new units."""
        raws = [json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
                for r in resources]
        outcomes = await asyncio.gather(*(self.receiver.receive(raw) for raw in raws))
        return sum(1 for o in outcomes if o.status != MessageStatus.DUPLICATE)


class PollError(Exception):
    """A run could not finish: the text is a kind (HTTP status, exception class), never content."""


def _server_time(header: str | None, fallback: datetime) -> datetime:
    if header:
        try:
            return parsedate_to_datetime(header).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return fallback


def _next_link(bundle: dict[str, Any], base_url: str) -> str | None:
    """The next page, on the EMR's own host only: the EMR's credentials go with it."""
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            base = httpx.URL(base_url)
            url = base.join(str(link["url"]))  # a relative link is the EMR's own
            if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
                raise PollError("the next page is on another host than the EMR; not followed")
            return str(url)
    return None


def register(registry: Registry) -> None:
    registry.add_source("fhir-poll", FhirPollSource)
