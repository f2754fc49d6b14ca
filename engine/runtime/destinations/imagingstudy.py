"""Queued destination `imagingstudy`: ask the PACS for a study, then write its ImagingStudy to the EMR.

Its payloads are study payloads (contract C3): queued by the `steps` destination when a step is
COMPLETED or the poll found a study (C1 FOUND unit), or, with `from_found: true` on a channel
without `steps`, made here from the FOUND unit. Images reach the PACS after the MPPS, often
minutes later, so delivery first asks the PACS (C-FIND, or QIDO-RS when `pacs.qido_url` is set):
while an instance the MPPS listed is missing the delivery is *deferred* (pending again after
`defer_seconds`, no attempt spent) until `wait_minutes` after it was queued; then the study is built
from what is there and the shortfall is recorded on the delivery as a warning. The write is a
conditional update on `urn:dicom:uid|urn:oid:<StudyInstanceUID>`, through the FHIR destination's
writer, so the same study again updates and a series added later updates the counts. Then the
accession's DiagnosticReport, when the EMR has one, is given `imagingStudy` -> this study.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset

from engine.dicom.pacs import Pacs, PacsError, StudyInfo, make_pacs
from engine.errors import REQUIRED_FIELD_MISSING, ProcessingError
from engine.fhir.client import FHIR_JSON, Auth, AuthConfig, AuthError, judge
from engine.fhir.imagingstudy import InstanceData, SeriesData, StudyData, build_imaging_study
from engine.fhir.models import FHIRValidationError, validate_resource
from engine.fhir.resources import PatientMode, Plan, plan_resources
from engine.fhir.writer import FhirWriter, Mode
from engine.runtime.destinations.base import (
    DeliveryOutcome,
    DestinationConfig,
    MessageContext,
    Payload,
    QueuedDestination,
)
from engine.runtime.registry import Registry

log = logging.getLogger(__name__)

STUDY_PAYLOAD = "application/json"
FOUND = "STUDY^FOUND"


class PacsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    aet: str = Field("ORTHANC", min_length=1, max_length=16)
    calling_aet: str = Field("ENGINE", min_length=1, max_length=16)
    qido_url: str = ""  # set: QIDO-RS instead of C-FIND
    timeout: float = Field(30.0, gt=0)


class ImagingStudyConfig(DestinationConfig):
    base_url: str
    mode: Mode = "conditional"  # conditional: PUT ImagingStudy?identifier=... | transaction: one Bundle
    fhir_version: Literal["R4B"] = "R4B"  # the builder writes R4 ImagingStudy (R5 changed modality and series)
    identifier_systems: dict[str, str] = {}  # accession, mrn, placer, filler -> this site's URIs
    patient: PatientMode = "identifier"
    auth: AuthConfig = AuthConfig()
    timeout: float = Field(30.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)
    verify_tls: bool = True
    ca_file: str = ""
    pacs: PacsSettings = PacsSettings()
    wait_minutes: float = Field(60.0, ge=0)  # how long images may lag behind the MPPS
    defer_seconds: float = Field(30.0, gt=0)  # how often the PACS is asked again meanwhile
    wadors_url: str = ""  # the PACS's WADO-RS base: ImagingStudy.endpoint
    timezone: str = "UTC"  # of DICOM dates and times (StudyDate/StudyTime carry no zone)
    # a poll's FOUND unit becomes a study payload here (a channel without `steps`; with it, `steps`
    # makes that payload, with the worklist's order numbers, unless an MPPS already reported the study)
    from_found: bool = False
    link_report: bool = True  # the accession's DiagnosticReport on the EMR gets imagingStudy -> this study


class ImagingStudyDestination(QueuedDestination):
    Config: ClassVar[type[DestinationConfig]] = ImagingStudyConfig
    config: ImagingStudyConfig

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        super().__init__(config, base_dir=base_dir)
        self.auth = Auth(self.config.auth)
        self.tz = ZoneInfo(self.config.timezone)
        self.client: httpx.AsyncClient | None = None
        self.writer: FhirWriter | None = None
        self.pacs: Pacs | None = None

    async def start(self) -> None:
        cfg = self.config
        verify: Any = cfg.ca_file or cfg.verify_tls
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
                                        verify=verify, follow_redirects=False)
        self.writer = FhirWriter(self.client, cfg.base_url, self.auth, mode=cfg.mode, guard_stale=False)
        p = cfg.pacs
        self.pacs = make_pacs(p.host, p.port, p.aet, p.qido_url, calling_aet=p.calling_aet, timeout=p.timeout)

    async def stop(self) -> None:
        if self.pacs is not None:
            await self.pacs.close()
            self.pacs = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # -- synchronous stage ---------------------------------------------------------------------
    def payloads(self, ctx: MessageContext, outputs: list[Any]) -> list[Payload]:
        """Study payloads come from `steps` (C2); here only a poll's FOUND unit becomes one."""
        if ctx.message_type != FOUND or not self.config.from_found:
            return []
        body = found_payload(ctx.raw)
        return [Payload(json.dumps(body).encode(), f"study:{body['study_instance_uid']}", STUDY_PAYLOAD)]

    # -- delivery ------------------------------------------------------------------------------
    async def deliver(self, payload: Payload) -> DeliveryOutcome:
        if self.writer is None or self.pacs is None:
            await self.start()
        assert self.writer is not None and self.pacs is not None
        try:
            wanted = json.loads(payload.body)
            uid = str(wanted["study_instance_uid"])
        except (ValueError, KeyError, TypeError):
            return DeliveryOutcome(ok=False, error="study payload is not JSON with study_instance_uid")
        try:
            found = await self.pacs.study(uid)
        except PacsError as exc:
            return DeliveryOutcome(ok=False, retry=exc.retry, error=f"PACS: {exc}")
        listed = listed_instances(wanted)
        have = found.instance_uids() if found is not None else set()
        missing = listed - have
        if found is None or missing:
            if not waited_enough(payload.meta.get("created_at"), self.config.wait_minutes):
                held = 0 if found is None else len(listed & have)
                return DeliveryOutcome(ok=False, defer=True, retry_after=self.config.defer_seconds,
                                       response=f"waiting for images: the PACS holds {held} of {len(listed)}")
            if found is None and not listed:
                return DeliveryOutcome(ok=False, error="the PACS does not hold the study")
        warning = ""
        if missing:
            warning = (f"warning: built after waiting {self.config.wait_minutes:g} min with "
                       f"{len(listed) - len(missing)} of {len(listed)} instances the MPPS listed; ")
        try:
            plan, notes = self.plan(wanted, found)
        except ProcessingError as exc:
            return DeliveryOutcome(ok=False, error=str(exc))
        result = await self.writer.write(plan)
        if result.ok and self.config.link_report:
            linked = await self._link_report(plan)
            if linked is not None:
                return linked
        if notes:
            warning += "warning: " + "; ".join(notes)[:1000] + "; "
        if warning and result.ok:
            log.warning("channel=%s destination=%s message=%s study %s written with warnings",
                        payload.meta.get("channel", ""), self.name, payload.meta.get("message_id", ""), uid)
        return DeliveryOutcome(ok=result.ok, retry=result.retry, response=warning + result.response,
                               error=result.error, retry_after=result.retry_after)

    async def _link_report(self, plan: Plan) -> DeliveryOutcome | None:
        """DiagnosticReport.imagingStudy of the accession's report(s) -> the study just written.

        A report written after the study (ORU after the images) replaces the link with its own PUT;
        the next write of the study (another series, the poll) puts it back."""
        assert self.client is not None
        study = plan.entries[-1]
        accession = next((i for i in study.resource.get("identifier") or []
                          if (i.get("type") or {}).get("coding", [{}])[0].get("code") == "ACSN"), None)
        if accession is None:
            return None
        base = self.config.base_url.rstrip("/")
        try:
            headers = {"Accept": FHIR_JSON, **(await self.auth.headers(self.client))}
            found = judge(await self.client.get(f"{base}/{study.search}", headers=headers))
            if not found.ok:  # retried whole: writing the study again is a conditional update
                return DeliveryOutcome(ok=False, retry=found.retry, error=f"HTTP {found.status} on ImagingStudy search")
            ids = [e["resource"]["id"] for e in (found.body or {}).get("entry") or []]
            if len(ids) != 1:
                return None
            ref = f"ImagingStudy/{ids[0]}"
            key = quote(f"{accession.get('system', '')}|{accession['value']}", safe="")
            ans = judge(await self.client.get(f"{base}/DiagnosticReport?identifier={key}", headers=headers))
            if not ans.ok:
                return DeliveryOutcome(ok=False, retry=ans.retry, error=f"HTTP {ans.status} on DiagnosticReport search")
            for entry in (ans.body or {}).get("entry") or []:
                report = entry.get("resource") or {}
                links = report.get("imagingStudy") or []
                if report.get("resourceType") != "DiagnosticReport" or any(r.get("reference") == ref for r in links):
                    continue
                report["imagingStudy"] = [*links, {"reference": ref}]
                vid = (report.get("meta") or {}).get("versionId")
                put_headers = {**headers, "Content-Type": FHIR_JSON, **({"If-Match": f'W/"{vid}"'} if vid else {})}
                put = judge(await self.client.put(f"{base}/DiagnosticReport/{report['id']}", json=report,
                                                  headers=put_headers), if_match=bool(vid))
                if not put.ok:  # 412: the report changed meanwhile; the retry reads it again
                    return DeliveryOutcome(ok=False, retry=put.retry, retry_after=put.retry_after,
                                           error=f"HTTP {put.status} on DiagnosticReport link: {put.diagnostics}")
        except AuthError as exc:
            return DeliveryOutcome(ok=False, retry=exc.retry, error=f"authentication failed: {exc}")
        except httpx.TransportError as exc:
            return DeliveryOutcome(ok=False, retry=True, error=f"DiagnosticReport link: {type(exc).__name__}")
        return None

    def plan(self, wanted: dict[str, Any], found: StudyInfo | None) -> tuple[Plan, list[str]]:
        study = study_data(wanted, found)
        if not study.patient_id:
            raise ProcessingError(f"{self.name}: no PatientID for study {study.uid}", REQUIRED_FIELD_MISSING)
        resources, patient, notes = build_imaging_study(study, tz=self.tz, wadors_url=self.config.wadors_url)
        plan = plan_resources(resources, self.config.identifier_systems, self.config.patient, patient)
        for entry in plan.entries:
            try:
                validate_resource(entry.resource, self.config.fhir_version)
            except FHIRValidationError as exc:
                raise ProcessingError(f"{self.name}: invalid FHIR {exc}") from None
        return plan, notes


def listed_instances(payload: dict[str, Any]) -> set[str]:
    return {
        str(i["sop_instance_uid"])
        for s in payload.get("performed_series") or []
        for i in s.get("instances") or []
        if isinstance(i, dict) and i.get("sop_instance_uid")
    }


def waited_enough(created_at: Any, minutes: float) -> bool:
    if not isinstance(created_at, datetime):
        return True  # no queue time known: do not wait forever
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)  # the store keeps UTC without a zone
    return datetime.now(UTC) - created_at >= timedelta(minutes=minutes)


def study_data(wanted: dict[str, Any], found: StudyInfo | None) -> StudyData:
    """The PACS says what is stored; the MPPS (payload) adds what only it knows (order, performers)."""
    performed = {str(s.get("series_instance_uid")): s for s in wanted.get("performed_series") or []}
    series = []
    for s in found.series if found is not None else []:
        mpps = performed.get(s.SeriesInstanceUID) or {}
        performers = [str(mpps["performer"])] if mpps.get("performer") else []
        if mpps and not performers:  # the MPPS names the step's performers, not each series'
            performers = [str(p) for p in wanted.get("performers") or [] if p]
        classes = {str(i.get("sop_instance_uid")): str(i.get("sop_class_uid") or "")
                   for i in mpps.get("instances") or []}
        series.append(SeriesData(
            s.SeriesInstanceUID, s.Modality or str(mpps.get("modality") or ""), s.SeriesNumber,
            s.SeriesDescription or str(mpps.get("series_description") or ""), s.BodyPartExamined, s.Laterality,
            (s.SeriesDate + s.SeriesTime) if s.SeriesDate else "", performers,
            [InstanceData(i.SOPInstanceUID, i.SOPClassUID or classes.get(i.SOPInstanceUID, ""), i.InstanceNumber)
             for i in s.instances],
        ))
    pacs_started = (found.StudyDate + found.StudyTime) if found is not None and found.StudyDate else ""

    def pick(key: str, pacs_value: str) -> str:
        return str(wanted.get(key) or "") or pacs_value

    return StudyData(
        uid=str(wanted["study_instance_uid"]),
        patient_id=pick("patient_id", found.PatientID if found else ""),
        accession=pick("accession_number", found.AccessionNumber if found else ""),
        patient_name=pick("patient_name", found.PatientName if found else ""),
        started=pick("started", pacs_started),
        description=(found.StudyDescription if found else "") or str(wanted.get("requested_procedure_description")
                                                                     or ""),
        referrer=pick("referring_physician", found.ReferringPhysicianName if found else ""),
        placer=str(wanted.get("placer_order") or ""),
        filler=str(wanted.get("filler_order") or ""),
        modalities=list(found.ModalitiesInStudy) if found else [],
        procedure_codes=[c for c in wanted.get("procedure_code") or [] if isinstance(c, dict)],
        series=series,
    )


def found_payload(raw: bytes) -> dict[str, Any]:
    """A FOUND unit (C1: the study-level answer of the poll) as a study payload (C3, source poll)."""
    try:
        unit = json.loads(raw)
        ds = Dataset.from_json(unit["dataset"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProcessingError(f"FOUND unit is not DICOM JSON ({type(exc).__name__})") from None
    uid = str(ds.get("StudyInstanceUID") or "").strip()
    if not uid:
        raise ProcessingError("FOUND unit has no StudyInstanceUID", REQUIRED_FIELD_MISSING, "StudyInstanceUID")
    text = {k: str(ds.get(k) or "").strip() for k in ("AccessionNumber", "PatientID", "IssuerOfPatientID",
                                                       "PatientName", "ReferringPhysicianName", "StudyDate",
                                                       "StudyTime")}
    return {
        "source": "poll", "study_instance_uid": uid, "accession_number": text["AccessionNumber"],
        "accession_issuer": "", "patient_id": text["PatientID"], "patient_issuer": text["IssuerOfPatientID"],
        "patient_name": text["PatientName"], "requested_procedure_id": "", "placer_order": "", "filler_order": "",
        "referring_physician": text["ReferringPhysicianName"], "requested_procedure_description": "",
        "procedure_code": [], "started": text["StudyDate"] + text["StudyTime"] if text["StudyDate"] else "",
        "performers": [], "station_aet": "", "performed_series": [], "mpps_sop_instance_uid": "", "status": "FOUND",
    }


def register(registry: Registry) -> None:
    registry.add_destination("imagingstudy", ImagingStudyDestination)
