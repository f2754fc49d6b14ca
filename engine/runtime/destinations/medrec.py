"""The `medrec` local destination: medication resources in -> reconciled records, in the unit's
transaction; and the read routes that serve the list as a FHIR List (contract C6).

Channel YAML (every key optional):

    - name: records
      type: medrec
      window_days: 100                 # calendar days back, both ends included
      timezone: America/New_York       # where the days are counted (IANA name); default UTC
      hierarchy: [MedicationDispense, MedicationAdministration, MedicationRequest, MedicationStatement]
      systems: [http://www.nlm.nih.gov/research/umls/rxnorm, http://hl7.org/fhir/sid/ndc, http://snomed.info/sct]
      table: mappings/tables/medication_groups.csv   # SBD -> SCD (RxNorm); "" for none
      text_merge: false                # merge text-only medications of equal text
      fallbacks: []                    # whenPrepared (dispense), dateAsserted (statement)
      list_name: ""                    # whose lists these sources join: "" = this channel's; a polling
                                       # channel names the pushing one, so a patient has one list
      push: ""                         # a queued `fhir` destination of the channel: each list that
                                       # changed is written to the EMR (conditional update by identifier)
      push_identifier_system: urn:x-engine:medication-list

`apply` reads `ctx.view.resource` (a medication resource, or a transaction Bundle whose
Medication entries resolve the others' `medicationReference`), stores each source, and recomputes
the records of every patient it touched. A resource that cannot be a source (no patient, a
malformed date) refuses the whole unit, naming the element.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from sqlalchemy.engine import Connection

from engine.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, ProcessingError
from engine.medrec.dates import zone
from engine.medrec.reconcile import MedRecord, Reconciliation, reconcile
from engine.medrec.rules import DEFAULT_HIERARCHY, DEFAULT_SYSTEMS, Rules
from engine.medrec.sources import MedSource, SourceError, extract_all, patient_key
from engine.runtime.destinations.base import RAW, DestinationConfig, Emitted, LocalDestination, MessageContext
from engine.runtime.registry import Registry
from engine.store import medrec as store

__all__ = ["MedrecDestination", "MedrecDestinationConfig", "patient_param", "register"]

log = logging.getLogger(__name__)

MedicationType = Literal["MedicationDispense", "MedicationAdministration", "MedicationRequest", "MedicationStatement"]


class MedrecDestinationConfig(DestinationConfig):
    window_days: int = Field(100, ge=1, le=36500)
    timezone: str = "UTC"
    hierarchy: list[MedicationType] = list(DEFAULT_HIERARCHY)  # type: ignore[arg-type]  # the four type names
    systems: list[str] = Field(default_factory=lambda: list(DEFAULT_SYSTEMS), min_length=1)
    table: str = "mappings/tables/medication_groups.csv"
    text_merge: bool = False
    fallbacks: list[Literal["whenPrepared", "dateAsserted"]] = []
    list_name: str = ""
    push: str = ""
    push_identifier_system: str = "urn:x-engine:medication-list"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("hierarchy")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a resource type appears twice in the hierarchy")
        return value


def patient_param(value: str) -> str:
    """The patient key a request names: `123`, `Patient/123` or a full Patient URL."""
    value = value.strip()
    return patient_key(value) if "/" in value or ":" in value else f"Patient/{value}"


class MedrecDestination(LocalDestination):
    Config: ClassVar[type[DestinationConfig]] = MedrecDestinationConfig
    config: MedrecDestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        return frozenset({RAW})  # the adapter's view of the received resource, no mapping

    @classmethod
    def emits(cls, config: DestinationConfig) -> list[str]:
        assert isinstance(config, MedrecDestinationConfig)
        return [config.push] if config.push else []

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        super().__init__(config, base_dir=base_dir)
        self._rules: Rules | None = None

    @classmethod
    def check_files(cls, config: DestinationConfig, base_dir: Path) -> list[str]:
        """Problems with the code table, found at load (`engine check`) rather than at start."""
        assert isinstance(config, MedrecDestinationConfig)
        from engine.mapping.tables import TableError

        try:
            cls._load_table(config, base_dir)
        except TableError as exc:
            return [f"table: {exc}"]
        return []

    async def start(self) -> None:
        self.rules  # noqa: B018 - the code table is read at start

    @property
    def rules(self) -> Rules:
        if self._rules is None:
            c = self.config
            self._rules = Rules(
                window_days=c.window_days,
                timezone=c.timezone,
                hierarchy=tuple(c.hierarchy),
                systems=tuple(c.systems),
                groups=self._groups(),
                text_merge=c.text_merge,
                fallbacks=frozenset(c.fallbacks),
            )
        return self._rules

    def _groups(self) -> Mapping[str, str]:
        return self._load_table(self.config, self.base_dir)

    @staticmethod
    def _load_table(config: MedrecDestinationConfig, base_dir: Any) -> Mapping[str, str]:
        if not config.table:
            return {}
        from engine.mapping.tables import load_csv_table

        path = Path(config.table)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return {k: str(v) for k, v in load_csv_table(path).entries.items()}

    def list_of(self, channel: str) -> str:
        """The name the sources and records are kept under (the store's `channel` column)."""
        return self.config.list_name or channel

    # -- the write side ----------------------------------------------------------------------------

    def prepare(self, ctx: MessageContext, outputs: list[Any]) -> None:
        """The sources read from the resource on the event loop (a bad one refuses the unit there)."""
        ctx.prepared[self.name] = self._read(ctx)

    @staticmethod
    def _read(ctx: MessageContext) -> tuple[list[MedSource], list[store.SourceRow]]:
        """The unit's sources and the rows they are stored as."""
        resource = getattr(ctx.view, "resource", ctx.view)
        if not isinstance(resource, dict):
            raise ProcessingError("the medrec destination needs a FHIR resource (input type fhir)")
        try:
            sources = [s for _, s in extract_all(resource)]
        except SourceError as exc:
            code = REQUIRED_FIELD_MISSING if exc.text.startswith(("no ", "a medication resource needs")) else (
                DATA_TYPE_ERROR)
            raise ProcessingError(exc.text, code, exc.location) from None
        rows = [store.SourceRow(s.resource_type, s.id, s.patient, s.status, s.as_dict(), s.last_updated)
                for s in sources]
        return sources, rows

    def apply(self, conn: Connection, ctx: MessageContext, outputs: list[Any]) -> list[Emitted] | None:
        prepared = ctx.prepared.get(self.name)
        sources, rows = prepared if prepared is not None else self._read(ctx)
        if not sources:
            return None  # a Patient or a Medication on its own: stored as received, nothing to reconcile
        received = ctx.received_at.astimezone(UTC).isoformat(timespec="microseconds")
        name = self.list_of(ctx.channel)
        saved = store.save_sources(conn, name, rows, message_id=ctx.message_id, received_at=received)
        # a source of this unit that was stored is recomputed from the object it came from (its
        # row's data dict is the very one in `current`); only the stored ones are read back
        mine = {id(row.data): s for row, s in zip(rows, sources, strict=True)}
        rules = self.rules
        today = rules.today()
        emitted = []
        for patient in sorted(saved.touched):
            data = saved.current.get(patient)
            if data is None:
                data = store.load_sources(conn, name, patient)
            result = reconcile(patient, [mine.get(id(d)) or MedSource.from_dict(d) for d in data], rules, today)
            if self._save(conn, name, result, stored=patient not in saved.fresh) and self.config.push:
                emitted.append(self._push(name, result))
        log.debug("medrec: %d source(s), %d patient(s) recomputed (message %s)", len(rows), len(saved.touched),
                  ctx.control_id)
        return emitted

    def _save(self, conn: Connection, channel: str, result: Reconciliation, *, stored: bool = True) -> bool:
        """Store the patient's records; True when they differ from the stored ones (asked only
        when lists are pushed: it costs a read). `stored=False`: the patient has none yet."""
        seen: dict[str, int] = {}
        records = []
        for record in result.records:
            n = seen[record.key] = seen.get(record.key, 0) + 1
            records.append((record.key if n == 1 else f"{record.key}#{n}", record.as_dict()))
        changed = True
        if self.config.push and stored:
            day, before = store.load_records(conn, channel, result.patient)
            changed = day != result.day.isoformat() or before != [data for _, data in records]
        store.replace_records(conn, channel, result.patient, records, result.day.isoformat(), stored=stored)
        return changed

    def _push(self, channel: str, result: Reconciliation) -> Emitted:
        """The list as one conditional write for the fhir destination (its plan format)."""
        from engine.fhir.resources import Plan, Planned
        from engine.medrec.fhir_list import build_list
        from engine.runtime.destinations.fhir import PLAN_TYPE

        lst = build_list(result, validate=False)
        ident = {"system": self.config.push_identifier_system, "value": f"{channel}:{result.patient}"}
        lst["identifier"] = [ident]
        plan = Plan([Planned(lst, f"{ident['system']}|{ident['value']}")])
        body = json.dumps(plan.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
        return Emitted(self.config.push, body, f"medlist:{result.patient}", PLAN_TYPE)

    # -- the read side -----------------------------------------------------------------------------

    def reconciliation(self, conn: Connection, channel: str, patient: str, as_of: date | None = None,
                       *, explain: bool = False) -> Reconciliation:
        """The patient's list: today's from the stored records (recomputed when they were computed
        on another day, or when the reasons for exclusions are asked for), or the list of `as_of`
        from the source versions received by the end of that day."""
        rules = self.rules
        channel = self.list_of(channel)
        if as_of is not None:
            end = datetime.combine(as_of + timedelta(days=1), time(0), rules.tz).astimezone(UTC)
            data = store.load_sources_as_of(conn, channel, patient, end.isoformat(timespec="microseconds"))
            return reconcile(patient, [MedSource.from_dict(d) for d in data], rules, as_of, as_of=True)
        today = rules.today()
        if not explain:
            day, records = store.load_records(conn, channel, patient)
            if day == today.isoformat():
                return Reconciliation(patient, today, [MedRecord.from_dict(r) for r in records], [])
        data = store.load_sources(conn, channel, patient)
        return reconcile(patient, [MedSource.from_dict(d) for d in data], rules, today)

    def http_router(self, db: Any, channel: str) -> Any:
        from engine.runtime.medrec_http import medication_list_router

        return medication_list_router(self, db, channel)


def register(registry: Registry) -> None:
    registry.add_destination("medrec", MedrecDestination)

