"""The `steps` local destination: MPPS N-CREATE/N-SET -> performed steps, worklist status, and
what the RIS and the EMR are told (IHE SWF RAD-6/RAD-7), in the unit's transaction.

- N-CREATE: a new step (an existing SOP instance is 0x0111). Each Scheduled Step Attributes item
  is matched to its worklist row (Study Instance UID, Accession Number, Requested Procedure ID,
  SPS ID); the row goes IN PROGRESS (the MWL shows STARTED). No match: the step is kept as
  unscheduled, with a warning and the flag `unscheduled` on the stored message.
- N-SET: an unknown SOP instance is 0x0112; a step already COMPLETED or DISCONTINUED is 0x0110
  with Error ID A710. Only the attributes PS3.4 lets an N-SET change are merged in. COMPLETED /
  DISCONTINUED move the worklist rows (the discontinuation reason is kept on the step).
- Each status change of a matched order emits (C2) an ORM^O01/OMI^O23 with ORC-1 SC and ORC-5
  IP/CM/DC for `status_to`; COMPLETED emits the study payload (C3) for `study_to`.
- STUDY^FOUND (a study the PACS poll found): the study payload with source "poll", unless a
  COMPLETED MPPS already reported that study with at least as many instances as the PACS holds
  (a series added after the MPPS is reported again, so the ImagingStudy's counts follow).

The required attributes of an N-CREATE are checked by the `dicom` adapter before this runs.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal

from pydantic import Field
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.engine import Connection

from engine.dicom.adapter import DicomView
from engine.dicom.mpps import FINAL, IN_PROGRESS, settable_part
from engine.dicom.status import (
    DUPLICATE_SOP_INSTANCE,
    MAY_NO_LONGER_BE_UPDATED,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    DicomRefusal,
)
from engine.errors import APPLICATION_INTERNAL_ERROR, ProcessingError, ProcessingWarning
from engine.hl7.status import ORDER_STATUS, Coded, OrderStatus, StatusFormat, build_status_message
from engine.runtime.destinations.base import DestinationConfig, Emitted, LocalDestination, MessageContext, raw_of
from engine.runtime.registry import Registry
from engine.store.messages import note_message
from engine.store.steps import completed_instances, get_step, insert_step, match_item, update_step
from engine.store.worklist import OPEN_STATUSES, SPS_SEQ, StepStatus, WorklistItem, set_status

__all__ = ["StepsDestination", "StepsDestinationConfig", "register", "study_payload"]

log = logging.getLogger(__name__)

SSAS = "ScheduledStepAttributesSequence"
UNSCHEDULED = "unscheduled"
# PPS status -> the worklist row's status
ITEM_STATUS = {
    "IN PROGRESS": StepStatus.IN_PROGRESS.value,
    "COMPLETED": StepStatus.COMPLETED.value,
    "DISCONTINUED": StepStatus.DISCONTINUED.value,
}


class StepsDestinationConfig(DestinationConfig):
    status_to: str | None = None  # the queued (mllp) destination that takes the RIS status messages
    study_to: str | None = None  # the queued destination that takes the study payload (C3)
    status_message: Literal["ORM^O01", "OMI^O23"] = "ORM^O01"
    hl7_version: str = "2.5.1"
    accession_field: str = Field("OBR-18", pattern=r"^(OBR|ORC)-\d{1,2}$")  # ORM only; OMI: IPC-1
    sending_application: str = "ENGINE"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""


def _s(value: Any) -> str:
    if value is None:
        return ""
    if type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = ds.get(keyword)
    return list(value) if value else []


def _codes(items: list[Any]) -> list[dict[str, str]]:
    """Code items (DICOM keyword dicts or Datasets) as C3's procedure_code entries."""
    out = []
    for item in items:
        get = item.get
        code = _s(get("CodeValue")) or _s(get("LongCodeValue")) or _s(get("URNCodeValue"))
        if code or _s(get("CodeMeaning")):
            out.append({"code": code, "system": _s(get("CodingSchemeDesignator")), "display": _s(get("CodeMeaning"))})
    return out


def _order_of(row: dict[str, Any]) -> dict[str, Any]:
    """What the engine knows of a matched worklist item's order, kept with the step."""
    ds = row["dataset"]
    sps = (ds.get(SPS_SEQ) or [{}])[0] or {}
    issuer = (ds.get("IssuerOfAccessionNumberSequence") or [{}])[0] or {}
    return {
        "item_id": row["id"],
        "placer_order": _s(ds.get("PlacerOrderNumberImagingServiceRequest")),
        "filler_order": _s(ds.get("FillerOrderNumberImagingServiceRequest")),
        "accession_number": _s(ds.get("AccessionNumber")),
        "accession_issuer": _s(issuer.get("LocalNamespaceEntityID")) if isinstance(issuer, dict) else "",
        "requested_procedure_id": _s(ds.get("RequestedProcedureID")),
        "requested_procedure_description": _s(ds.get("RequestedProcedureDescription")),
        "procedure_code": _codes(ds.get("RequestedProcedureCodeSequence") or []),
        "sps_id": _s(sps.get("ScheduledProcedureStepID")),
        "study_instance_uid": _s(ds.get("StudyInstanceUID")),
        "patient_id": _s(ds.get("PatientID")),
        "patient_issuer": _s(ds.get("IssuerOfPatientID")),
        "patient_name": _s(ds.get("PatientName")),
        "referring_physician": _s(ds.get("ReferringPhysicianName")),
    }


def _started(date: Any, time: Any) -> str:
    d, t = _s(date).replace(".", ""), _s(time).replace(":", "").split(".")[0]
    return f"{d}{t.ljust(6, '0')[:6]}" if len(d) == 8 else ""


def _series(pps: Dataset) -> list[dict[str, Any]]:
    modality = _s(pps.get("Modality"))
    out = []
    for s in _items(pps, "PerformedSeriesSequence"):
        refs = _items(s, "ReferencedImageSequence") + _items(s, "ReferencedNonImageCompositeSOPInstanceSequence")
        out.append({
            "series_instance_uid": _s(s.get("SeriesInstanceUID")),
            "modality": modality,
            "series_description": _s(s.get("SeriesDescription")),
            "performer": _s(s.get("PerformingPhysicianName")) or _s(s.get("OperatorsName")),
            "protocol_name": _s(s.get("ProtocolName")),
            "instances": [
                {"sop_instance_uid": _s(r.get("ReferencedSOPInstanceUID")),
                 "sop_class_uid": _s(r.get("ReferencedSOPClassUID"))}
                for r in refs
            ],
        })
    return out


def study_payload(
    source: str, status: str, study_uid: str, order: dict[str, Any] | None, found: Dataset, *,
    pps: Dataset | None = None, mpps_uid: str = ""
) -> dict[str, Any]:
    """The C3 study payload. `found` is the PPS (source mpps) or the PACS's study answer (poll);
    the order, when one matched, gives what only the RIS knew."""
    o = order or {}
    first = (_items(found, SSAS) or [Dataset()])[0]
    series = _series(pps) if pps is not None else []
    performers = list(dict.fromkeys(s["performer"] for s in series if s["performer"]))
    codes = _codes(_items(found, "ProcedureCodeSequence")) or o.get("procedure_code") or []
    if pps is not None:
        started = _started(pps.get("PerformedProcedureStepStartDate"), pps.get("PerformedProcedureStepStartTime"))
    else:
        started = _started(found.get("StudyDate"), found.get("StudyTime"))
    return {
        "source": source,
        "study_instance_uid": study_uid,
        "accession_number": o.get("accession_number")
        or _s(found.get("AccessionNumber"))
        or _s(first.get("AccessionNumber")),
        "accession_issuer": o.get("accession_issuer", ""),
        "patient_id": _s(found.get("PatientID")) or o.get("patient_id", ""),
        "patient_issuer": _s(found.get("IssuerOfPatientID")) or o.get("patient_issuer", ""),
        "patient_name": _s(found.get("PatientName")) or o.get("patient_name", ""),
        "requested_procedure_id": o.get("requested_procedure_id") or _s(first.get("RequestedProcedureID")),
        "placer_order": o.get("placer_order", ""),
        "filler_order": o.get("filler_order", ""),
        "referring_physician": o.get("referring_physician") or _s(found.get("ReferringPhysicianName")),
        "requested_procedure_description": o.get("requested_procedure_description")
        or _s(first.get("RequestedProcedureDescription")) or _s(found.get("StudyDescription")),
        "procedure_code": codes,
        "started": started,
        "performers": performers,
        "station_aet": _s(pps.get("PerformedStationAETitle")) if pps is not None else "",
        "performed_series": series,
        "mpps_sop_instance_uid": mpps_uid,
        "status": status,
    }


class StepsDestination(LocalDestination):
    Config: ClassVar[type[DestinationConfig]] = StepsDestinationConfig
    config: StepsDestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        return frozenset({raw_of("dicom")})

    @classmethod
    def emits(cls, config: DestinationConfig) -> list[str]:
        assert isinstance(config, StepsDestinationConfig)
        return [n for n in (config.status_to, config.study_to) if n]

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        super().__init__(config, base_dir=base_dir)
        c = self.config
        self.format = StatusFormat(c.status_message, c.hl7_version, c.accession_field, c.sending_application,
                                   c.sending_facility, c.receiving_application, c.receiving_facility)

    def apply(self, conn: Connection, ctx: MessageContext, outputs: list[Any]) -> list[Emitted] | None:
        view = ctx.view
        if not isinstance(view, DicomView):
            raise ProcessingError("the steps destination takes dicom units", APPLICATION_INTERNAL_ERROR)
        if view.command == "N-CREATE":
            return self._create(conn, ctx, view)
        if view.command == "N-SET":
            return self._set(conn, view)
        if view.command == "FOUND":
            return self._found(conn, view)
        unknown = f"command {view.command or '(empty)'} is not known"
        raise ProcessingError(unknown, APPLICATION_INTERNAL_ERROR, "command")

    # -- N-CREATE ------------------------------------------------------------------------------------

    def _create(self, conn: Connection, ctx: MessageContext, view: DicomView) -> list[Emitted]:
        uid = view.sop_instance_uid
        if get_step(conn, uid) is not None:
            raise DicomRefusal("this Performed Procedure Step already exists", DUPLICATE_SOP_INSTANCE,
                               "sop_instance_uid")
        pps = view.dataset
        rows: dict[int, dict[str, Any]] = {}
        for item in _items(pps, SSAS):
            row = match_item(
                conn,
                study_instance_uid=_s(item.get("StudyInstanceUID")),
                accession_number=_s(item.get("AccessionNumber")),
                requested_procedure_id=_s(item.get("RequestedProcedureID")),
                sps_id=_s(item.get("ScheduledProcedureStepID")),
            )
            if row is not None:
                rows.setdefault(row["id"], row)
        orders = [_order_of(r) for r in rows.values()]
        first = (_items(pps, SSAS) or [Dataset()])[0]
        study_uid = _s(first.get("StudyInstanceUID"))
        step_id = insert_step(
            conn,
            {"pps": pps.to_json_dict(), "orders": orders},
            sop_instance_uid=uid,
            channel=ctx.channel,
            status=IN_PROGRESS,
            study_instance_uid=study_uid,
            accession_number=_s(first.get("AccessionNumber"))[:64],
            patient_id=_s(pps.get("PatientID"))[:200],
            calling_aet=view.get("calling_aet")[:16],
            worklist_items=",".join(str(i) for i in rows),
            message_id=ctx.message_id,
        )
        if step_id is None:  # another node created it meanwhile: as if it had come first
            raise DicomRefusal("this Performed Procedure Step already exists", DUPLICATE_SOP_INSTANCE,
                               "sop_instance_uid")
        if not rows:
            warning = ProcessingWarning(
                "no worklist item matches the Scheduled Step Attributes: kept as an unscheduled step",
                location=SSAS, target="worklist",
            )
            if ctx.message_id is not None:
                note_message(conn, ctx.message_id, flag=UNSCHEDULED, warnings=[warning])
            log.warning("MPPS %s: unscheduled (no worklist item matched)", uid)
            return []
        for row in rows.values():
            if row["status"] in OPEN_STATUSES:  # a cancelled order is not reopened by the modality
                set_status(conn, row["id"], ITEM_STATUS[IN_PROGRESS])
        return self._statuses(orders, pps, IN_PROGRESS)

    # -- N-SET ---------------------------------------------------------------------------------------

    def _set(self, conn: Connection, view: DicomView) -> list[Emitted]:
        uid = view.sop_instance_uid
        step = get_step(conn, uid, for_update=True)
        if step is None:
            raise DicomRefusal("no such Performed Procedure Step", NO_SUCH_SOP_INSTANCE, "sop_instance_uid")
        old = step["status"]
        if old in FINAL:
            raise DicomRefusal(f"the step is {old} and may no longer be updated", PROCESSING_FAILURE,
                               "PerformedProcedureStepStatus", error_id=MAY_NO_LONGER_BE_UPDATED)
        changes = settable_part(view.dataset)
        record = step["record"]
        merged = dict(record.get("pps") or {})
        merged.update(changes.to_json_dict())
        record["pps"] = merged
        pps = Dataset.from_json(merged)
        new = _s(pps.get("PerformedProcedureStepStatus")).upper() or old
        reason = ""
        for item in _items(pps, "PerformedProcedureStepDiscontinuationReasonCodeSequence")[:1]:
            reason = "^".join((_s(item.get("CodeValue")), _s(item.get("CodingSchemeDesignator")),
                               _s(item.get("CodeMeaning"))))[:200]
        count = sum(len(s["instances"]) for s in _series(pps))
        update_step(conn, step["id"], record, status=new, discontinuation_reason=reason, instance_count=count)
        if new == old:
            return []
        orders = _still_open(conn, record.get("orders") or [])  # a cancelled order is not completed by the modality
        for order in orders:
            set_status(conn, int(order["item_id"]), ITEM_STATUS[new])
        emitted = self._statuses(orders, pps, new)
        if new == "COMPLETED" and self.config.study_to:
            payload = study_payload("mpps", "COMPLETED", step["study_instance_uid"], orders[0] if orders else None,
                                    pps, pps=pps, mpps_uid=uid)
            emitted.append(self._study(payload))
        return emitted

    # -- FOUND ---------------------------------------------------------------------------------------

    def _found(self, conn: Connection, view: DicomView) -> list[Emitted]:
        found = view.dataset
        study_uid = _s(found.get("StudyInstanceUID"))
        if not self.config.study_to:
            return []
        listed = completed_instances(conn, study_uid)
        held = int(_s(found.get("NumberOfStudyRelatedInstances")) or 0)
        if listed is not None and held <= listed:
            return []  # the COMPLETED MPPS of this study produced its payload already
        row = match_item(conn, study_instance_uid=study_uid, accession_number=_s(found.get("AccessionNumber")))
        payload = study_payload("poll", "FOUND", study_uid, _order_of(row) if row is not None else None, found)
        return [self._study(payload)]

    # -- what is emitted -----------------------------------------------------------------------------

    def _statuses(self, orders: list[dict[str, Any]], pps: Dataset, status: str) -> list[Emitted]:
        if not self.config.status_to:
            return []
        reason = Coded()
        for item in _items(pps, "PerformedProcedureStepDiscontinuationReasonCodeSequence")[:1]:
            reason = Coded(
                _s(item.get("CodeValue")), _s(item.get("CodeMeaning")), _s(item.get("CodingSchemeDesignator"))
            )
        out = []
        for o in orders:
            code = (o.get("procedure_code") or [{}])[0]
            message = OrderStatus(
                order_status=ORDER_STATUS[status],
                placer_order=o["placer_order"],
                filler_order=o["filler_order"],
                accession_number=o["accession_number"],
                requested_procedure_id=o["requested_procedure_id"],
                sps_id=o["sps_id"],
                study_instance_uid=o["study_instance_uid"],
                modality=_s(pps.get("Modality")),
                patient_id=o["patient_id"] or _s(pps.get("PatientID")),
                patient_issuer=o["patient_issuer"],
                patient_name=o["patient_name"] or _s(pps.get("PatientName")),
                procedure=Coded(code.get("code", ""), code.get("display", ""), code.get("system", "")),
                started=_started(pps.get("PerformedProcedureStepStartDate"),
                                 pps.get("PerformedProcedureStepStartTime")),
                ended=_started(pps.get("PerformedProcedureStepEndDate"), pps.get("PerformedProcedureStepEndTime")),
                reason=reason if status == "DISCONTINUED" else Coded(),
            )
            key = o["filler_order"] or o["placer_order"] or o["accession_number"]
            body = build_status_message(message, self.format).encode("utf-8")
            out.append(Emitted(self.config.status_to, body, f"order:{key}", "x-application/hl7-v2+er7"))
        return out

    def _study(self, payload: dict[str, Any]) -> Emitted:
        assert self.config.study_to is not None
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Emitted(self.config.study_to, body, f"study:{payload['study_instance_uid']}", "application/json")


def register(registry: Registry) -> None:
    registry.add_destination("steps", StepsDestination)


def _still_open(conn: Connection, orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step's orders whose worklist item is still scheduled or in progress (the RIS may have
    cancelled one while the modality worked: its status stays, and the RIS hears nothing of it)."""
    ids = [int(o["item_id"]) for o in orders]
    if not ids:
        return []
    table = WorklistItem.__table__  # type: ignore[attr-defined]  # SQLModel declares it at class creation
    rows = conn.execute(select(table.c.id).where(table.c.id.in_(ids), table.c.status.in_(OPEN_STATUSES)))
    open_ids = set(rows.scalars())
    return [o for o in orders if int(o["item_id"]) in open_ids]
