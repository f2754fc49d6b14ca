"""DIMSE statuses for refusals, and the stored form of a DICOM answer.

A refusal is a `ProcessingError`; where the HL7 code cannot say which DICOM status is meant
(0x0120 missing attribute and 0x0121 missing value are both HL7 101), `DicomRefusal` carries the
status itself, with the Error ID and the attributes PS3.7 annex C asks for. The answer stored
with a message is the status element set as JSON (`Status`, `ErrorComment`, `ErrorID`,
`AttributeIdentifierList`), so a resent request gets exactly the answer the first one got.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engine.errors import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    DUPLICATE_KEY_IDENTIFIER,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNKNOWN_KEY_IDENTIFIER,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    ProcessingError,
)

__all__ = [
    "DUPLICATE_SOP_INSTANCE",
    "INVALID_ATTRIBUTE_VALUE",
    "MAY_NO_LONGER_BE_UPDATED",
    "MISSING_ATTRIBUTE",
    "MISSING_ATTRIBUTE_VALUE",
    "NO_SUCH_SOP_INSTANCE",
    "PROCESSING_FAILURE",
    "SUCCESS",
    "DicomAnswer",
    "DicomRefusal",
    "answer_for",
]

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
UNRECOGNIZED_OPERATION = 0x0211
# PS3.4 F.7.2.2 (Error ID with 0x0110): the PPS is COMPLETED or DISCONTINUED
MAY_NO_LONGER_BE_UPDATED = 0xA710

# an HL7 table 0357 code -> the DIMSE status that says the same
_BY_CODE = {
    REQUIRED_FIELD_MISSING: MISSING_ATTRIBUTE,
    DATA_TYPE_ERROR: INVALID_ATTRIBUTE_VALUE,
    TABLE_VALUE_NOT_FOUND: INVALID_ATTRIBUTE_VALUE,
    UNSUPPORTED_MESSAGE_TYPE: UNRECOGNIZED_OPERATION,
    UNSUPPORTED_EVENT_CODE: UNRECOGNIZED_OPERATION,
    UNKNOWN_KEY_IDENTIFIER: NO_SUCH_SOP_INSTANCE,
    DUPLICATE_KEY_IDENTIFIER: DUPLICATE_SOP_INSTANCE,
}
# the HL7 code stored (messages.error_code) for a DICOM-specific refusal
_CODE_FOR = {
    MISSING_ATTRIBUTE: REQUIRED_FIELD_MISSING,
    MISSING_ATTRIBUTE_VALUE: REQUIRED_FIELD_MISSING,
    INVALID_ATTRIBUTE_VALUE: DATA_TYPE_ERROR,
    DUPLICATE_SOP_INSTANCE: DUPLICATE_KEY_IDENTIFIER,
    NO_SUCH_SOP_INSTANCE: UNKNOWN_KEY_IDENTIFIER,
}
COMMENT_MAX = 64  # Error Comment is LO


class DicomRefusal(ProcessingError):
    """A refusal that knows its DIMSE status. `location` is the attribute's keyword path;
    `tags` the attributes in error as 8 hex digits (Attribute Identifier List)."""

    def __init__(
        self,
        text: str,
        status: int,
        location: str = "",
        *,
        tags: list[str] | None = None,
        error_id: int | None = None,
    ) -> None:
        super().__init__(text, _CODE_FOR.get(status, APPLICATION_INTERNAL_ERROR), location)
        self.status = status
        self.tags = tags or []
        self.error_id = error_id


@dataclass
class DicomAnswer:
    """The status element set of one DIMSE response."""

    status: int = SUCCESS
    comment: str = ""
    error_id: int | None = None
    tags: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        body: dict[str, Any] = {"Status": self.status}
        if self.comment:
            body["ErrorComment"] = self.comment[:COMMENT_MAX]
        if self.error_id is not None:
            body["ErrorID"] = self.error_id
        if self.tags:
            body["AttributeIdentifierList"] = self.tags
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DicomAnswer:
        """The stored answer; anything unreadable is a processing failure (never a success)."""
        try:
            body = json.loads(text)
            return cls(
                int(body["Status"]),
                str(body.get("ErrorComment", "")),
                int(body["ErrorID"]) if body.get("ErrorID") is not None else None,
                [str(t) for t in body.get("AttributeIdentifierList", [])],
            )
        except (ValueError, KeyError, TypeError):
            return cls(PROCESSING_FAILURE, "answer unreadable")


def answer_for(error: ProcessingError | None) -> DicomAnswer:
    """Success, or the refusal's status: its own when it is a DicomRefusal, else by HL7 code."""
    if error is None:
        return DicomAnswer()
    if isinstance(error, DicomRefusal):
        return DicomAnswer(error.status, error.text, error.error_id, list(error.tags))
    return DicomAnswer(_BY_CODE.get(error.code, PROCESSING_FAILURE), error.text)
