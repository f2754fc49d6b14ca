"""The procedure status update the RIS gets when the modality starts, completes or discontinues
a step (IHE SWF: the DSS/OF tells the order placer/filler): ORM^O01 or OMI^O23 with ORC-1 = SC.

ORC-5 says where the order is: IP (in process), CM (completed), DC (discontinued, with the
reason in ORC-16). The order is named as the RIS knows it: placer (ORC-2/OBR-2), filler
(ORC-3/OBR-3) and accession (OBR-18 or the configured field for ORM, IPC-1 for OMI). Every value
is escaped; MSH-10 is unique per message; text beyond ASCII goes as UTF-8, said in MSH-18.
Knows nothing of DICOM: the caller fills `OrderStatus`.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.hl7.er7 import DEFAULT_ENCODING
from engine.hl7.escape import escape

__all__ = ["ORDER_STATUS", "Coded", "OrderStatus", "StatusFormat", "build_status_message", "new_status_id"]

# the step status a modality reports -> ORC-5 (HL7 table 0038)
ORDER_STATUS = {"IN PROGRESS": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC"}

_counter = itertools.count()
_PID = os.getpid() % 1000


def new_status_id() -> str:
    """MSH-10 for a status message: 'S' + milliseconds + process + counter (20 chars, ST 20)."""
    return f"S{int(time.time() * 1000):013d}{_PID:03d}{next(_counter) % 1000:03d}"


@dataclass(frozen=True)
class Coded:
    code: str = ""
    meaning: str = ""
    scheme: str = ""


@dataclass
class OrderStatus:
    order_status: str  # ORC-5: IP / CM / DC
    placer_order: str = ""
    filler_order: str = ""
    accession_number: str = ""
    requested_procedure_id: str = ""
    sps_id: str = ""
    study_instance_uid: str = ""
    modality: str = ""
    patient_id: str = ""
    patient_issuer: str = ""
    patient_name: str = ""  # DICOM PN text (family^given^middle^prefix^suffix)
    procedure: Coded = field(default_factory=Coded)
    started: str = ""  # YYYYMMDDHHMMSS
    ended: str = ""
    reason: Coded = field(default_factory=Coded)  # why it was discontinued (ORC-16)


@dataclass(frozen=True)
class StatusFormat:
    message: str = "ORM^O01"  # or OMI^O23
    version: str = "2.5.1"
    accession_field: str = "OBR-18"  # ORM only: where the accession goes ("OBR-18", "OBR-20", "ORC-4" ...)
    sending_application: str = "ENGINE"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""


def _e(value: str) -> str:
    return escape(value, DEFAULT_ENCODING)


def _comps(*values: str) -> str:
    return "^".join(_e(v) for v in values).rstrip("^")


def _coded(c: Coded) -> str:
    return _comps(c.code, c.meaning, c.scheme) if c.code or c.meaning else ""


def _xpn(pn: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as XPN (family^given^middle^suffix^prefix);
    only the alphabetic group."""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _comps(family, given, middle, suffix, prefix)


def _segment(name: str, fields: dict[int, str]) -> str:
    last = max(fields) if fields else 0
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


def build_status_message(status: OrderStatus, fmt: StatusFormat, *, control_id: str | None = None,
                         now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S%z")  # with its offset, as the engine's ACKs
    omi = fmt.message.upper().startswith("OMI")
    structure = "OMI^O23^OMI_O23" if omi else "ORM^O01^ORM_O01"
    msh = "|".join([
        "MSH", "^~\\&", _e(fmt.sending_application), _e(fmt.sending_facility), _e(fmt.receiving_application),
        _e(fmt.receiving_facility), stamp, "", structure, control_id or new_status_id(), "P", fmt.version,
    ])
    pid3 = _comps(status.patient_id, "", "", status.patient_issuer) if status.patient_id else ""
    pid = _segment("PID", {1: "1", 3: pid3, 5: _xpn(status.patient_name)})
    orc: dict[int, str] = {1: "SC", 2: _e(status.placer_order), 3: _e(status.filler_order), 5: status.order_status,
                           9: stamp}
    if status.reason.code or status.reason.meaning:
        orc[16] = _coded(status.reason)
    obr: dict[int, str] = {1: "1", 2: _e(status.placer_order), 3: _e(status.filler_order), 4: _coded(status.procedure)}
    if status.started:
        obr[7] = _e(status.started)
    if status.ended:
        obr[8] = _e(status.ended)
    segments = [msh, pid]
    if omi:
        segments += [_segment("ORC", orc), _segment("OBR", obr)]
        ipc = {1: _e(status.accession_number), 2: _e(status.requested_procedure_id),
               3: _e(status.study_instance_uid), 4: _e(status.sps_id), 5: _e(status.modality)}
        segments.append(_segment("IPC", ipc))
    else:
        obr[19] = _e(status.requested_procedure_id)
        obr[20] = _e(status.sps_id)
        if status.modality:
            obr[24] = _e(status.modality)
        seg, _, num = fmt.accession_field.partition("-")
        target = obr if seg == "OBR" else orc
        target[int(num)] = _e(status.accession_number)
        segments += [_segment("ORC", orc), _segment("OBR", obr)]
    text = "\r".join(segments) + "\r"
    if not text.isascii():  # a name in another script: say how the bytes (UTF-8) are to be read
        head, rest = text.split("\r", 1)
        fields = head.split("|") + [""] * 6
        fields[17] = "UNICODE UTF-8"  # MSH-18 (MSH-1 is the separator itself)
        text = "|".join(fields[:18]) + "\r" + rest
    return text
