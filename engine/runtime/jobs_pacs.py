"""The PACS poll: studies that reached the PACS without an MPPS (a modality that sends none, a
study imported from CD) still get their ImagingStudy.

Every `pacs.poll_minutes` the PACS is asked for the studies of the last `pacs.poll_days` days (by
StudyDate, in the site's time zone); each answer goes into the `pacs-studies` channel as a FOUND
unit (contract C1), stored and deduplicated like any received unit: its control id is
`<StudyInstanceUID>#<NumberOfStudyRelatedInstances>`, so a study polled again unchanged is a
duplicate and one that grew is new. The channel's destinations decide the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from engine.dicom.pacs import Pacs, PacsError, StudyInfo, study_dataset
from engine.inputs import Outcome
from engine.store.models import MessageStatus

__all__ = ["FOUND_SOP_CLASS", "PacsPoll", "found_unit"]

log = logging.getLogger(__name__)

FOUND_SOP_CLASS = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND


class Receiver(Protocol):
    """What the poll hands units to (the channel's pipeline); no adapter needed, unlike a source's."""

    async def receive(self, raw: bytes, *, replay_of: int | None = None) -> Outcome: ...


def found_unit(study: StudyInfo, engine_aet: str) -> bytes:
    """The raw bytes of a FOUND unit (C1): the study-level answer as DICOM JSON."""
    unit = {
        "command": "FOUND",
        "sop_class_uid": FOUND_SOP_CLASS,
        "sop_instance_uid": study.StudyInstanceUID,
        "calling_aet": "",
        "called_aet": engine_aet,
        "dataset": study_dataset(study).to_json_dict(),
    }
    return json.dumps(unit, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class PacsPoll:
    """One poll run per call; `make` builds the PACS client each run (closed after it)."""

    def __init__(self, make: Callable[[], Pacs], receiver: Receiver, *, days: int, engine_aet: str,
                 tz: ZoneInfo, channel: str = "pacs-studies") -> None:
        self.make = make
        self.receiver = receiver
        self.days = days
        self.engine_aet = engine_aet
        self.tz = tz
        self.channel = channel

    async def run(self) -> dict[str, int]:
        """Counts by stored status (processed: new or grown studies, duplicate: unchanged)."""
        today = datetime.now(self.tz).date()
        pacs = self.make()
        try:
            studies = await pacs.find_studies(today - timedelta(days=self.days), today)
        except PacsError as exc:
            log.warning("channel=%s PACS poll failed: %s", self.channel, exc)
            return {}
        finally:
            await pacs.close()
        counts: dict[str, int] = {}
        for study in studies:
            if not study.StudyInstanceUID:
                continue
            try:
                outcome = await self.receiver.receive(found_unit(study, self.engine_aet))
            except Exception as exc:  # the store failed: its text can quote the unit (PHI), so the type only
                log.error("channel=%s PACS poll stopped: %s", self.channel, type(exc).__name__)
                break  # the next run asks again
            status = str(outcome.status)
            counts[status] = counts.get(status, 0) + 1
        if counts.get(MessageStatus.PROCESSED) or counts.get(MessageStatus.ERROR):
            log.info("channel=%s PACS poll: %d studies, %s", self.channel, len(studies),
                     ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return counts
