"""The `worklist` local destination: HL7 order lifecycle -> worklist rows, in the message's transaction.

Each mapped output is one ORDER group ({"control": {"order_control", "order_status"}, "dataset"})
or one ADT event ({"control": {"event": "A08"|"A40", ...}, "dataset"}).

- ORC-1 + "_" + ORC-5 picks the step status from `status_map` (dcm4chee defaults: NW_SC, NW_IP,
  XO_SC -> SCHEDULED; CA_CA -> CANCELLED; DC_CA -> DISCONTINUED; XO_CM -> COMPLETED); with ORC-5
  empty (most senders leave it so) and no pair, ORC-1's own entry does (NW, XO -> SCHEDULED;
  CA -> CANCELLED; DC -> DISCONTINUED). Neither: refused (AE 103 at ORC-1; 101 when ORC-1 is
  empty) and nothing changes.
- Order identity: the filler order number (ORC-3, the RIS's own number) when present, else the
  placer order number (ORC-2) narrowed by the accession number when there is one. Within an
  order, a step is found by its SPS ID (or is the order's only step).
- NW for an order that already exists updates it, as dcm4chee-arc does (HL7 resends after a lost
  ACK are common); `on_existing_new: reject` answers AE 205 instead. The order identity and SPS ID
  are a unique key: when two engine processes store one order at once, the second insert meets
  the first one's row and becomes the update it would have made had it seen that row.
- XO/CA/DC for an unknown order: AE 204 at ORC-3 (ORC-2 when only a placer number was sent).
- An update may not move an order to another patient: AE at PID-3 (use A40 to merge patients).
- An update without StudyInstanceUID keeps the stored one; an update does not put an
  IN PROGRESS step (started by the modality) back to SCHEDULED.
- A08 copies demographics into the patient's open items; A40 moves the prior patient's open items
  to the surviving patient.

Any ProcessingError rolls back the whole message (the writer does it); this class only raises.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, Literal

from pydantic import field_validator
from sqlalchemy.engine import Connection

from engine.errors import (
    APPLICATION_INTERNAL_ERROR,
    DUPLICATE_KEY_IDENTIFIER,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNKNOWN_KEY_IDENTIFIER,
    ProcessingError,
)
from engine.runtime.destinations.base import DestinationConfig, LocalDestination, MessageContext
from engine.runtime.registry import Registry
from engine.store.worklist import (
    SPS_SEQ,
    DuplicateItem,
    StepStatus,
    find_items,
    insert_item,
    merge_patient,
    set_status,
    update_item,
    update_patient,
)

__all__ = ["DEFAULT_STATUS_MAP", "WorklistDestination", "WorklistDestinationConfig", "register", "step_status"]

log = logging.getLogger(__name__)

DEFAULT_STATUS_MAP: dict[str, str] = {
    # ORC-1_ORC-5 pairs (dcm4chee-arc's defaults, IHE RAD-4/RAD-13)
    "NW_SC": StepStatus.SCHEDULED.value,
    "NW_IP": StepStatus.SCHEDULED.value,
    "XO_SC": StepStatus.SCHEDULED.value,
    "CA_CA": StepStatus.CANCELLED.value,
    "DC_CA": StepStatus.DISCONTINUED.value,
    "XO_CM": StepStatus.COMPLETED.value,
    # ORC-1 alone, used when ORC-5 is empty and no pair matches: most RIS leave ORC-5 empty
    "NW": StepStatus.SCHEDULED.value,
    "XO": StepStatus.SCHEDULED.value,  # an update of the order
    "CA": StepStatus.CANCELLED.value,
    "DC": StepStatus.DISCONTINUED.value,
}
_STATUSES = {s.value for s in StepStatus}


class WorklistDestinationConfig(DestinationConfig):
    status_map: dict[str, str] = dict(DEFAULT_STATUS_MAP)
    on_existing_new: Literal["update", "reject"] = "update"

    @field_validator("status_map")
    @classmethod
    def _known_statuses(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted({v for v in value.values() if v not in _STATUSES})
        if bad:
            raise ValueError(f"unknown step status {bad}; use one of {sorted(_STATUSES)}")
        return {k.upper(): v for k, v in value.items()}


def step_status(status_map: dict[str, str], order_control: str, order_status: str) -> str | None:
    """The step status for ORC-1 + ORC-5: the pair's entry; with ORC-5 empty and no pair, ORC-1's
    own entry; else None (refused). A sent ORC-5 without a pair (NW_CM, XO_CA) contradicts ORC-1,
    so it is refused rather than guessed."""
    status = status_map.get(f"{order_control}_{order_status}")
    if status is None and not order_status:
        status = status_map.get(order_control)
    return status


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


class WorklistDestination(LocalDestination):
    Config: ClassVar[type[DestinationConfig]] = WorklistDestinationConfig
    config: WorklistDestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        return frozenset({"dicom"})  # worklist items from a mapping with `output: dicom`

    def apply(self, conn: Connection, ctx: MessageContext, outputs: list[Any]) -> None:
        for output in outputs:
            if not isinstance(output, dict):
                raise ProcessingError("worklist output is not a mapping", APPLICATION_INTERNAL_ERROR)
            control = output.get("control") or {}
            dataset = output.get("dataset") or {}
            event = _text(control.get("event")).upper()
            if event:
                self._adt(conn, ctx, event, control, dataset)
            else:
                try:
                    self._order(conn, ctx, control, dataset)
                except DuplicateItem:
                    # another engine process stored this order's step since we looked: the insert
                    # becomes the update this process would have made had it seen the row
                    log.info("worklist: order stored meanwhile by another process; updating it (message %s)",
                             ctx.control_id)
                    self._order(conn, ctx, control, dataset)

    # -- orders --------------------------------------------------------------------------------------

    def _order(self, conn: Connection, ctx: MessageContext, control: dict[str, Any], dataset: dict[str, Any]) -> None:
        oc = _text(control.get("order_control")).upper()
        os_ = _text(control.get("order_status")).upper()
        if not oc:
            raise ProcessingError("order control code missing", REQUIRED_FIELD_MISSING, "ORC-1")
        status = step_status(self.config.status_map, oc, os_)
        if status is None:
            raise ProcessingError(
                f"order control {oc} with order status {os_ or '(empty)'} is not configured",
                TABLE_VALUE_NOT_FOUND,
                "ORC-1",
            )
        filler = _text(dataset.get("FillerOrderNumberImagingServiceRequest"))
        placer = _text(dataset.get("PlacerOrderNumberImagingServiceRequest"))
        accession = _text(dataset.get("AccessionNumber"))
        if not filler and not placer:
            raise ProcessingError("neither placer nor filler order number", REQUIRED_FIELD_MISSING, "ORC-2")
        key_location = "ORC-3" if filler else "ORC-2"
        rows = find_items(conn, filler_order=filler, placer_order=placer, accession_number=accession)

        if not rows:
            if oc != "NW":
                raise ProcessingError(f"unknown order ({oc})", UNKNOWN_KEY_IDENTIFIER, key_location)
            for step in self._steps(dataset):
                insert_item(conn, step, channel=ctx.channel, status=status, keyed=True)
            log.debug("worklist: order created (%s, message %s)", oc, ctx.control_id)
            return

        self._same_patient(rows, dataset)
        if oc == "NW" and self.config.on_existing_new == "reject":
            raise ProcessingError("order already exists", DUPLICATE_KEY_IDENTIFIER, key_location)

        if status == StepStatus.SCHEDULED.value:
            self._update(conn, ctx, rows, dataset, status)
            log.debug("worklist: order updated (%s, message %s)", oc, ctx.control_id)
        else:
            for row in rows:
                set_status(conn, row["id"], status)
            log.debug("worklist: order %s -> %s (message %s)", oc, status, ctx.control_id)

    @staticmethod
    def _steps(dataset: dict[str, Any]) -> list[dict[str, Any]]:
        """One dataset per scheduled procedure step (a row each)."""
        steps = [s for s in dataset.get(SPS_SEQ) or [] if isinstance(s, dict)] or [{}]
        out = []
        for step in steps:
            item = copy.deepcopy(dataset)
            item[SPS_SEQ] = [copy.deepcopy(step)]
            out.append(item)
        return out

    @staticmethod
    def _same_patient(rows: list[dict[str, Any]], dataset: dict[str, Any]) -> None:
        pid = _text(dataset.get("PatientID"))
        issuer = _text(dataset.get("IssuerOfPatientID"))
        for row in rows:
            if pid and row["patient_id"] and pid != row["patient_id"]:
                raise ProcessingError(
                    "order belongs to another patient (merge patients with A40)", APPLICATION_INTERNAL_ERROR, "PID-3"
                )
            if pid and issuer and row["issuer"] and issuer != row["issuer"]:
                raise ProcessingError(
                    "order belongs to another patient identifier issuer", APPLICATION_INTERNAL_ERROR, "PID-3.4"
                )

    def _update(
        self, conn: Connection, ctx: MessageContext, rows: list[dict[str, Any]], dataset: dict[str, Any], status: str
    ) -> None:
        by_sps = {row["sps_id"]: row for row in rows if row["sps_id"]}
        steps = self._steps(dataset)
        for step in steps:
            sps_id = _text(step[SPS_SEQ][0].get("ScheduledProcedureStepID"))
            row = by_sps.get(sps_id) if sps_id else None
            if row is None and len(rows) == 1 and len(steps) == 1:
                row = rows[0]
            if row is None:
                insert_item(conn, step, channel=ctx.channel, status=status, keyed=True)
                continue
            stored = row["dataset"]
            if not _text(step.get("StudyInstanceUID")) and stored.get("StudyInstanceUID"):
                step["StudyInstanceUID"] = stored["StudyInstanceUID"]
            keep_started = row["status"] == StepStatus.IN_PROGRESS.value and status == StepStatus.SCHEDULED.value
            update_item(conn, row["id"], step, status=None if keep_started else status, keyed=True)

    # -- patients ------------------------------------------------------------------------------------

    def _adt(
        self, conn: Connection, ctx: MessageContext, event: str, control: dict[str, Any], dataset: dict[str, Any]
    ) -> None:
        pid = _text(dataset.get("PatientID"))
        issuer = _text(dataset.get("IssuerOfPatientID"))
        if event == "A08":
            if not pid:
                raise ProcessingError("patient identifier missing", REQUIRED_FIELD_MISSING, "PID-3")
            count = update_patient(conn, pid, issuer, dataset)
            log.debug("worklist: A08 updated %d open items (message %s)", count, ctx.control_id)
        elif event == "A40":
            prior = _text(control.get("prior_patient_id"))
            if not prior:
                raise ProcessingError("prior patient identifier missing", REQUIRED_FIELD_MISSING, "MRG-1")
            if not pid:
                raise ProcessingError("patient identifier missing", REQUIRED_FIELD_MISSING, "PID-3")
            count = merge_patient(conn, prior, _text(control.get("prior_issuer")), pid, issuer, dataset)
            log.debug("worklist: A40 moved %d open items (message %s)", count, ctx.control_id)
        # other ADT events do not touch the worklist


def register(registry: Registry) -> None:
    registry.add_destination("worklist", WorklistDestination)
