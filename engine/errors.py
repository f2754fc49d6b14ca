"""The one exception every layer raises when a message cannot be processed.

It carries what the sender needs to fix the message (an HL7 table 0357 code and an ERR-2
location); the HL7 layer turns it into an ERR segment, the FHIR layer into an OperationOutcome,
the DICOM layer into a failure status. Texts never contain PHI (names, report text): they name
fields, not their values.
"""

from __future__ import annotations

from dataclasses import dataclass

# HL7 table 0357 message error condition codes used by the engine.
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION_ID = 203
UNKNOWN_KEY_IDENTIFIER = 204
DUPLICATE_KEY_IDENTIFIER = 205
APPLICATION_RECORD_LOCKED = 206
APPLICATION_INTERNAL_ERROR = 207


class ProcessingError(Exception):
    """A message (or one part of it) was refused; `ack_code` is AE (fix and resend) or AR (reject)."""

    def __init__(
        self,
        text: str,
        code: int = APPLICATION_INTERNAL_ERROR,
        location: str = "",
        *,
        ack_code: str = "AE",
        source: str = "",
    ) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.location = location
        self.ack_code = ack_code
        self.source = source  # e.g. "mappings/orm-to-worklist.yaml:42" for a mapping rule

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        src = f" ({self.source})" if self.source else ""
        return f"{self.text}{where}{src}"


@dataclass(frozen=True)
class ProcessingWarning:
    """An optional value that was dropped or cut so that the message could still be processed.

    The message is accepted (`AA`); the warning is stored with it and answered as an ERR segment
    of severity W (ERR-4). Like `ProcessingError`, its text names the field, never the value.
    """

    text: str
    code: int = DATA_TYPE_ERROR
    location: str = ""  # HL7 location (ERR-2), e.g. "ORC-7.6"
    source: str = ""  # e.g. "mappings/orm-to-worklist.yaml:42"
    target: str = ""  # the output field, e.g. "RequestedProcedurePriority"

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        src = f" ({self.source})" if self.source else ""
        return f"{self.text}{where}{src}"

    def as_dict(self) -> dict[str, object]:
        return {"text": self.text, "code": self.code, "location": self.location,
                "source": self.source, "target": self.target}
