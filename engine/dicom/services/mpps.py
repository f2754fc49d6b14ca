"""Modality Performed Procedure Step SCP (PS3.4 annex F, IHE RAD-6/RAD-7): N-CREATE and N-SET.

Thin on purpose: each request is wrapped in the C1 envelope and handed to the engine (the
`pacs-studies` channel) through `ServiceContext.submit`, which returns only once the unit is
committed; the DIMSE status is read from the answer stored with it, so a resent request gets the
first one's answer. Everything else (required attributes, the step's state, the worklist item)
is decided in the channel. A request whose dataset cannot be decoded is stored with its bytes and
refused 0x0110; so is anything that raises (nothing escapes into pynetdicom). Offered only when
a channel takes MPPS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.events import Event, EventType
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]  # pynetdicom makes its SOP classes at import

from engine.dicom.adapter import envelope
from engine.dicom.mpps import MPPS_SOP_CLASS
from engine.dicom.scp import DicomServiceRegistry, Handler, ServiceContext, ae_title_key, caller_aet, caller_allowed
from engine.dicom.status import PROCESSING_FAILURE, DicomAnswer
from engine.inputs import Outcome

__all__ = ["MppsService", "register"]

log = logging.getLogger(__name__)

NOT_AUTHORISED = 0x0124
Answer = tuple[Dataset | int, Dataset | None]


def _status(answer: DicomAnswer, *, with_attributes: bool) -> Dataset:
    ds = Dataset()
    ds.Status = answer.status
    if answer.comment:
        ds.ErrorComment = answer.comment
    if answer.error_id is not None:
        ds.ErrorID = answer.error_id
    if with_attributes and answer.tags:
        ds.AttributeIdentifierList = [int(t, 16) for t in answer.tags]
    return ds


def _failure(comment: str) -> Dataset:
    return _status(DicomAnswer(PROCESSING_FAILURE, comment), with_attributes=False)


class MppsService:
    name = "mpps"
    sop_classes = (ModalityPerformedProcedureStep,)

    def __init__(self, submit: Callable[[bytes], Outcome], ae_title: str = "") -> None:
        self.submit = submit
        self.ae_title = ae_title

    def handlers(self) -> list[tuple[EventType, Handler]]:
        return [(evt.EVT_N_CREATE, self.on_create), (evt.EVT_N_SET, self.on_set)]

    def on_create(self, event: Event) -> Answer:
        caller = "?"
        try:
            caller = caller_aet(event)
            if not caller_allowed(event):
                return NOT_AUTHORISED, None
            given = getattr(event.request, "AffectedSOPInstanceUID", None)
            uid = str(given) if given else generate_uid()  # the SCP assigns one when the SCU did not
            answer = self._run(event, "N-CREATE", uid, caller)
            reply = None
            if not given and answer.status == 0:
                reply = Dataset()
                reply.AffectedSOPInstanceUID = uid
            return _status(answer, with_attributes=False), reply
        except Exception as exc:  # the type only: a dataset's text holds PHI
            log.error("MPPS N-CREATE from %s failed: %s", caller, type(exc).__name__)
            return _failure("processing failed"), None

    def on_set(self, event: Event) -> Answer:
        caller = "?"
        try:
            caller = caller_aet(event)
            if not caller_allowed(event):
                return NOT_AUTHORISED, None
            uid = str(getattr(event.request, "RequestedSOPInstanceUID", None) or "")
            answer = self._run(event, "N-SET", uid, caller)
            return _status(answer, with_attributes=True), None
        except Exception as exc:
            log.error("MPPS N-SET from %s failed: %s", caller, type(exc).__name__)
            return _failure("processing failed"), None

    def _run(self, event: Event, command: str, uid: str, caller: str) -> DicomAnswer:
        called = ae_title_key(str(event.assoc.acceptor.ae_title)) or self.ae_title
        try:  # pydicom decodes lazily: a broken dataset raises while it is written out
            dataset = event.attribute_list if command == "N-CREATE" else event.modification_list
            raw = envelope(command, MPPS_SOP_CLASS, uid, caller, called, dataset)
        except Exception as exc:
            log.warning("MPPS %s from %s uid=%s: dataset not decodable (%s)", command, caller, uid, type(exc).__name__)
            raw = envelope(command, MPPS_SOP_CLASS, uid, caller, called, None, undecodable=_request_bytes(event))
        outcome = self.submit(raw)
        answer = DicomAnswer.from_json(outcome.answer)
        log.info("MPPS %s from %s uid=%s status=0x%04X message=%s", command, caller, uid, answer.status,
                 outcome.message_id)
        return answer


def _request_bytes(event: Event) -> bytes:
    """The request's dataset as it came on the wire (Attribute / Modification List)."""
    for name in ("AttributeList", "ModificationList"):
        value = getattr(event.request, name, None)
        if value is not None:
            return bytes(value.getvalue()) if hasattr(value, "getvalue") else bytes(value)
    return b""


def register(registry: DicomServiceRegistry) -> None:
    def factory(context: ServiceContext) -> MppsService:
        if context.submit is None:
            raise ValueError("the MPPS service needs a channel with a dicom source")
        return MppsService(context.submit, str(context.settings.get("ae_title", "")))

    registry.add(MppsService.name, factory)
