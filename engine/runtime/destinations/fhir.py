"""Deliver mapped resources to the EMR's FHIR server (queued).

In the synchronous stage every resource is built, given its identifier systems and validated
(fhir.resources R4B models, or R5; in full once per resource shape, see `engine.fhir.models`); an
invalid one refuses the message with the validation text and nothing is queued. One payload per
mapping output (one report with its Observations, one ServiceRequest ...), ordered per patient by
default, so a correction never overtakes its final.
Writes are idempotent (see `engine.fhir.writer`); 408/429/5xx, timeouts and connection errors
are retried honouring Retry-After, any other 4xx goes `dead` with the server's OperationOutcome.
One httpx client per destination (keep-alive, at most `max_parallel` requests in flight); with
`imaging_study_lookup: true` a report references the EMR's ImagingStudy of its accession.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import REQUIRED_FIELD_MISSING, ProcessingError
from engine.fhir.client import Auth, AuthConfig
from engine.fhir.models import FHIRValidationError, FhirVersion, for_version, validate_resource
from engine.fhir.resources import PatientMode, Plan, plan_resources
from engine.fhir.results import ReportError, ReportOptions, build_report, is_report
from engine.fhir.writer import FhirWriter, Mode
from engine.runtime.destinations.base import (
    DeliveryOutcome,
    DestinationConfig,
    MessageContext,
    Payload,
    QueuedDestination,
    raw_of,
)
from engine.runtime.registry import Registry

log = logging.getLogger(__name__)

PLAN_TYPE = "application/x-engine-fhir-plan+json"


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conclusion_heading: str = "IMPRESSION"  # the report section that becomes DiagnosticReport.conclusion
    language: str = ""  # presentedForm.language, e.g. en or de-DE
    title: str = "Report"
    observation_system: str = ""  # identifier system (name or URI) of Observations; empty: the report's


class FhirDestinationConfig(DestinationConfig):
    base_url: str
    mode: Mode = "transaction"  # transaction: one Bundle per output; conditional: one PUT per resource
    fhir_version: FhirVersion = "R4B"  # R5: fhir.resources' R5 models (ServiceRequest.code -> concept)
    # system names used by mappings -> URIs of this site (filler, placer, accession, mrn, practitioner ...)
    identifier_systems: dict[str, str] = {}
    patient: PatientMode = "identifier"  # identifier | conditional (server resolves) | create (If-None-Exist)
    auth: AuthConfig = AuthConfig()
    timeout: float = Field(30.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)
    max_parallel: int = Field(8, ge=1, le=64)  # requests in flight to the server
    order_by: Literal["patient", "destination", "none"] = "patient"
    stale_check: bool = True  # a late older report (OBR-22 / MSH-7) never overwrites a newer one
    # DiagnosticReport.imagingStudy: look up ImagingStudy?identifier=<accession> on the EMR at delivery
    imaging_study_lookup: bool = False
    verify_tls: bool = True
    ca_file: str = ""
    report: ReportConfig = ReportConfig()
    # a mapping of its own (under mappings/), run on the received HL7 v2 message: for a channel whose
    # own mapping feeds another destination (ris-orders: worklist items, and ServiceRequests here)
    mapping: str = ""


class FhirDestination(QueuedDestination):
    Config: ClassVar[type[DestinationConfig]] = FhirDestinationConfig
    config: FhirDestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        """Resources from `output: fhir` mappings; with a mapping of its own, the HL7 v2 message."""
        assert isinstance(config, FhirDestinationConfig)
        return frozenset({raw_of("hl7v2")}) if config.mapping else frozenset({"fhir"})

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        super().__init__(config, base_dir=base_dir)
        cfg = self.config
        r = cfg.report
        self.options = ReportOptions(r.conclusion_heading, r.language, r.title, r.observation_system)
        self.auth = Auth(cfg.auth)
        self.client: httpx.AsyncClient | None = None
        self.writer: FhirWriter | None = None
        self.mapping: Any = None
        if cfg.mapping:
            from engine.mapping import load_mapping

            path = Path(cfg.mapping)
            if not path.is_absolute():
                path = Path(base_dir or ".") / "mappings" / path
            self.mapping = load_mapping(path)
            if self.mapping.output != "fhir":
                raise ValueError(f"destination {self.name}: mapping {self.mapping.name} does not make fhir output")

    async def start(self) -> None:
        cfg = self.config
        verify: Any = cfg.ca_file or cfg.verify_tls
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=cfg.max_parallel, max_keepalive_connections=cfg.max_parallel),
            verify=verify,
            follow_redirects=False,
        )
        self.writer = FhirWriter(self.client, cfg.base_url, self.auth, mode=cfg.mode, guard_stale=cfg.stale_check,
                                 parallel=cfg.max_parallel, imaging_study_lookup=cfg.imaging_study_lookup)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # -- synchronous stage ---------------------------------------------------------------------
    def payloads(self, ctx: MessageContext, outputs: list[Any]) -> list[Payload]:
        key = {"patient": ctx.patient_id, "destination": "", "none": ctx.control_id}[self.config.order_by]
        if self.mapping is not None:
            outputs = self.mapping.run(ctx.view)
        out = []
        for n, output in enumerate(outputs, 1):
            plan = self.plan(output, n if len(outputs) > 1 else 0)
            body = pydantic_core.to_json(plan.to_json())  # compact UTF-8, as json.dumps but ~5x faster
            out.append(Payload(body, ordering_key=key, content_type=PLAN_TYPE))
        return out

    def plan(self, output: Any, number: int = 0) -> Plan:
        """Build and validate what one mapping output writes; ProcessingError when it cannot be sent."""
        where = f" (output {number})" if number else ""
        patient = None
        try:
            if is_report(output):
                resources = build_report(output, self.options)
                patient = output.get("Patient") if isinstance(output.get("Patient"), dict) else None
            elif isinstance(output, dict) and isinstance(output.get("resourceType"), str):
                resources = [output]
            else:
                raise ProcessingError(f"{self.name}: a fhir mapping output is a resource or a report{where}")
        except ReportError as exc:
            raise ProcessingError(f"{self.name}: {exc}{where}", REQUIRED_FIELD_MISSING) from None
        version = self.config.fhir_version
        plan = plan_resources(resources, self.config.identifier_systems, self.config.patient, patient)
        for entry in plan.entries:
            entry.resource = for_version(entry.resource, version)
            if not entry.key and not entry.create_only:
                raise ProcessingError(
                    f"{self.name}: {entry.type} has no identifier, so it cannot be written idempotently{where}",
                    REQUIRED_FIELD_MISSING,
                )
            try:
                validate_resource(entry.resource, version)
            except FHIRValidationError as exc:
                raise ProcessingError(f"{self.name}: invalid FHIR {exc}{where}") from None
        return plan

    # -- delivery ------------------------------------------------------------------------------
    async def deliver(self, payload: Payload) -> DeliveryOutcome:
        if self.writer is None:
            await self.start()
        assert self.writer is not None
        plan = Plan.from_json(pydantic_core.from_json(payload.body))
        result = await self.writer.write(plan)
        if result.skipped:
            log.warning(
                "channel=%s destination=%s message=%s stale report not applied: the server holds a newer one",
                payload.meta.get("channel", ""),
                self.name,
                payload.meta.get("message_id", ""),
            )
        return DeliveryOutcome(
            ok=result.ok,
            retry=result.retry,
            response=result.response,
            error=result.error,
            retry_after=result.retry_after,
        )


def register(registry: Registry) -> None:
    registry.add_destination("fhir", FhirDestination)
