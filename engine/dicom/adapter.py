"""The `dicom` input adapter: a DICOM unit (an MPPS N-CREATE/N-SET, a study the PACS poll found)
in, a DIMSE status out.

The SCP's service (or the poll job) wraps what it got in an envelope (contract C1): UTF-8 JSON
with the command, the SOP class and instance, the AE titles and the dataset in the DICOM JSON
model (PS3.18 annex F), so the stored raw unit is readable without pydicom. Identity: an N-CREATE
is its SOP Instance UID; an N-SET its UID + "#" + a digest of its modification list (the same
N-SET resent is a duplicate, a new one is not); a found study its UID + "#" + its instance count.
The answer is the status element set as JSON (`engine.dicom.status`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from engine.dicom.mpps import MPPS_SOP_CLASS, check_create, check_set
from engine.dicom.status import PROCESSING_FAILURE, DicomRefusal, answer_for
from engine.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, ProcessingError, ProcessingWarning
from engine.inputs import AdapterOptions, AnswerBuilder, Outcome, Received

__all__ = ["COMMANDS", "CONTENT_TYPE", "DicomAdapter", "DicomOptions", "DicomView", "envelope", "message_type"]

CONTENT_TYPE = "application/dicom+json"
COMMANDS = {"N-CREATE": "MPPS^N-CREATE", "N-SET": "MPPS^N-SET", "FOUND": "STUDY^FOUND"}
_ENVELOPE_KEYS = ("command", "sop_class_uid", "sop_instance_uid", "calling_aet", "called_aet")
_STEP = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


def message_type(command: str) -> str:
    return COMMANDS.get(command, command)


def envelope(
    command: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    calling_aet: str,
    called_aet: str,
    dataset: Dataset | None,
    *,
    undecodable: bytes | None = None,
) -> bytes:
    """The raw unit for a DICOM request (C1). A dataset that could not be decoded is kept as its
    bytes (`undecodable`, base64): stored as received, then refused."""
    body: dict[str, Any] = {
        "command": command,
        "sop_class_uid": sop_class_uid,
        "sop_instance_uid": sop_instance_uid,
        "calling_aet": calling_aet,
        "called_aet": called_aet,
        "dataset": dataset.to_json_dict() if dataset is not None else {},
    }
    if undecodable is not None:
        body["undecodable"] = base64.b64encode(undecodable).decode("ascii")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


class DicomView:
    """The unit as filters and destinations read it: `get("AccessionNumber")`,
    `get("ScheduledStepAttributesSequence[0].AccessionNumber")`, `get("command")`."""

    def __init__(self, envelope: dict[str, Any], dataset: Dataset) -> None:
        self.envelope = envelope
        self.dataset = dataset
        self.refusal: DicomRefusal | None = None  # found while parsing, raised by the adapter's check

    @property
    def command(self) -> str:
        return str(self.envelope.get("command", ""))

    @property
    def sop_instance_uid(self) -> str:
        return str(self.envelope.get("sop_instance_uid", ""))

    def get(self, path: str) -> str:
        if path in _ENVELOPE_KEYS:
            return str(self.envelope.get(path, ""))
        node: Any = self.dataset
        for step in path.split("."):
            m = _STEP.match(step)
            if m is None or not isinstance(node, Dataset) or tag_for_keyword(m.group(1)) is None:
                return ""  # not a DICOM keyword: pydicom would warn on the `in` test
            if m.group(1) not in node:
                return ""
            node = node.get(m.group(1))
            if m.group(2) is not None:
                items = list(node) if node is not None else []
                index = int(m.group(2))
                if index >= len(items):
                    return ""
                node = items[index]
        if isinstance(node, Dataset) or type(node).__name__ == "Sequence":
            return ""
        return _text(node)

    def __repr__(self) -> str:  # no dataset values: they hold PHI
        return f"DicomView({self.command} {self.sop_instance_uid})"


class DicomOptions(AdapterOptions):
    type: Literal["dicom"] = "dicom"


def _digest(dataset_json: Any) -> str:
    canon = json.dumps(dataset_json, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canon).hexdigest()[:16]


class DicomAdapter:
    name: ClassVar[str] = "dicom"
    Options: ClassVar[type[AdapterOptions]] = DicomOptions
    content_type: ClassVar[str] = CONTENT_TYPE
    type_location: ClassVar[str] = "command"

    def __init__(self, options: AdapterOptions) -> None:
        self.options = options

    def parse(self, raw: bytes) -> Received:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProcessingError("not a DICOM unit (JSON envelope expected)", DATA_TYPE_ERROR) from None
        if not isinstance(body, dict) or not isinstance(body.get("dataset", {}), dict):
            raise ProcessingError("not a DICOM unit (JSON object with a dataset expected)", DATA_TYPE_ERROR)
        if "undecodable" in body:
            raise DicomRefusal("the dataset could not be decoded", PROCESSING_FAILURE, "dataset")
        try:
            dataset = Dataset.from_json(body.get("dataset") or {})
        except Exception as exc:  # pydicom raises many kinds for a malformed JSON model
            raise ProcessingError(f"dataset is not DICOM JSON ({type(exc).__name__})", DATA_TYPE_ERROR) from None
        view = DicomView(body, dataset)
        command = view.command
        warnings: list[ProcessingWarning] = []
        if command == "FOUND":
            control_id = f"{view.get('StudyInstanceUID')}#{view.get('NumberOfStudyRelatedInstances')}"
        elif command == "N-SET":
            control_id = f"{view.sop_instance_uid}#{_digest(body.get('dataset'))}" if view.sop_instance_uid else ""
        else:
            control_id = view.sop_instance_uid
        if str(body.get("sop_class_uid", "")) == MPPS_SOP_CLASS:
            if command == "N-CREATE":
                view.refusal, warnings = check_create(dataset)
            elif command == "N-SET":
                view.refusal, warnings = check_set(dataset)
        return Received(
            view=view,
            message_type=message_type(command),
            control_id=control_id,
            sender=str(body.get("calling_aet", "")),
            patient_id=view.get("PatientID"),
            warnings=warnings,
        )

    def check(self, unit: Received) -> None:
        view = unit.view
        assert isinstance(view, DicomView)
        if not unit.control_id or unit.control_id == "#":
            what = "StudyInstanceUID" if view.command == "FOUND" else "sop_instance_uid"
            raise ProcessingError(f"{what} is empty", REQUIRED_FIELD_MISSING, what)
        if view.refusal is not None:
            raise view.refusal

    def answer(self, unit: Received) -> AnswerBuilder:
        return _answer

    def refusal(self, raw: bytes) -> tuple[AnswerBuilder, str]:
        return _answer, "utf-8"

    def split(self, raw: bytes) -> list[bytes] | None:
        return None

    def combine(self, outcomes: Sequence[Outcome]) -> bytes:
        return b"\n".join(o.answer_bytes() for o in outcomes)


def _answer(_status: str, error: ProcessingError | None, _warnings: Sequence[ProcessingWarning]) -> str:
    return answer_for(error).to_json()
