"""Asking the PACS what it holds: one interface, two transports.

`CFindPacs` speaks DIMSE (Study Root Query/Retrieve C-FIND at STUDY, SERIES and IMAGE level, one
association per question, TCP_NODELAY on the socket: pynetdicom leaves Nagle on, which costs ~40 ms
per multi-PDU answer); `QidoPacs` speaks QIDO-RS (DICOMweb over httpx) when `PACS_QIDO_URL` is set.
Both return the same plain dataclasses, whose fields are DICOM keywords, so the caller never knows
which one answered. Errors are `PacsError` with a text that names the step, never a value (PHI).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

import httpx
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from engine.dicom.scp import quiet_pynetdicom, set_nodelay

__all__ = [
    "CFindPacs",
    "InstanceInfo",
    "Pacs",
    "PacsError",
    "QidoPacs",
    "SeriesInfo",
    "StudyInfo",
    "find_query",
    "make_pacs",
    "study_dataset",
]

log = logging.getLogger(__name__)

STUDY_KEYS = (
    "StudyInstanceUID", "AccessionNumber", "PatientID", "IssuerOfPatientID", "PatientName", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined", "Laterality",
    "SeriesDate", "SeriesTime", "NumberOfSeriesRelatedInstances",
)
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "SeriesInstanceUID")
_TAGS = {k: f"{tag_for_keyword(k):08X}" for k in (*STUDY_KEYS, *SERIES_KEYS, *INSTANCE_KEYS)}
PENDING = (0xFF00, 0xFF01)


class PacsError(Exception):
    """The PACS could not be asked or refused the query; `retry` says whether asking later may help."""

    def __init__(self, text: str, *, retry: bool = True) -> None:
        super().__init__(text)
        self.retry = retry


@dataclass
class InstanceInfo:
    SOPInstanceUID: str
    SOPClassUID: str = ""
    InstanceNumber: int | None = None


@dataclass
class SeriesInfo:
    SeriesInstanceUID: str
    SeriesNumber: int | None = None
    Modality: str = ""
    SeriesDescription: str = ""
    BodyPartExamined: str = ""
    Laterality: str = ""
    SeriesDate: str = ""
    SeriesTime: str = ""
    instances: list[InstanceInfo] = field(default_factory=list)


@dataclass
class StudyInfo:
    StudyInstanceUID: str
    AccessionNumber: str = ""
    PatientID: str = ""
    IssuerOfPatientID: str = ""
    PatientName: str = ""  # DICOM PN text (Family^Given)
    StudyDate: str = ""
    StudyTime: str = ""
    ReferringPhysicianName: str = ""
    StudyDescription: str = ""
    ModalitiesInStudy: list[str] = field(default_factory=list)
    NumberOfStudyRelatedSeries: int | None = None
    NumberOfStudyRelatedInstances: int | None = None
    series: list[SeriesInfo] = field(default_factory=list)  # filled by `study()`, empty from `find_studies()`

    def instance_uids(self) -> set[str]:
        return {i.SOPInstanceUID for s in self.series for i in s.instances}


class Pacs(Protocol):
    async def study(self, study_uid: str) -> StudyInfo | None:
        """The study with its series and instances; None when the PACS holds nothing of it."""
        ...

    async def find_studies(self, start: date, end: date) -> list[StudyInfo]:
        """Study-level answers for StudyDate in [start, end] (no series)."""
        ...

    async def close(self) -> None: ...


# -- from an answer (either transport) to the dataclasses -------------------------------------------
class Answer(Protocol):
    def get(self, keyword: str) -> Any: ...


class JsonAnswer:
    """One QIDO-RS answer (DICOM JSON, PS3.18 F.2) read by keyword without building a pydicom
    Dataset: that costs ~1 ms an instance, more than the PACS takes to send it."""

    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item

    def get(self, keyword: str) -> Any:
        tag = _TAGS.get(keyword)
        element = self.item.get(tag) if tag else None
        values = element.get("Value") if isinstance(element, dict) else None
        if not values:
            return None
        values = [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in values]  # PN: its alphabetic group
        return values[0] if len(values) == 1 else values


def _text(ds: Answer, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, list | tuple) or getattr(value, "is_multival", False):  # MultiValue
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _list(ds: Answer, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split("\\") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def _int(ds: Answer, keyword: str) -> int | None:
    text = _text(ds, keyword)
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None  # a PACS that sends a broken IS: the count is unknown, not an error


def study_from(ds: Answer) -> StudyInfo:
    return StudyInfo(
        _text(ds, "StudyInstanceUID"),
        AccessionNumber=_text(ds, "AccessionNumber"),
        PatientID=_text(ds, "PatientID"),
        IssuerOfPatientID=_text(ds, "IssuerOfPatientID"),
        PatientName=_text(ds, "PatientName"),
        StudyDate=_text(ds, "StudyDate"),
        StudyTime=_text(ds, "StudyTime"),
        ReferringPhysicianName=_text(ds, "ReferringPhysicianName"),
        StudyDescription=_text(ds, "StudyDescription"),
        ModalitiesInStudy=sorted(_list(ds, "ModalitiesInStudy")),
        NumberOfStudyRelatedSeries=_int(ds, "NumberOfStudyRelatedSeries"),
        NumberOfStudyRelatedInstances=_int(ds, "NumberOfStudyRelatedInstances"),
    )


def series_from(ds: Answer) -> SeriesInfo:
    return SeriesInfo(
        _text(ds, "SeriesInstanceUID"),
        SeriesNumber=_int(ds, "SeriesNumber"),
        Modality=_text(ds, "Modality"),
        SeriesDescription=_text(ds, "SeriesDescription"),
        BodyPartExamined=_text(ds, "BodyPartExamined"),
        Laterality=_text(ds, "Laterality"),
        SeriesDate=_text(ds, "SeriesDate"),
        SeriesTime=_text(ds, "SeriesTime"),
    )


def instance_from(ds: Answer) -> InstanceInfo:
    return InstanceInfo(_text(ds, "SOPInstanceUID"), _text(ds, "SOPClassUID"), _int(ds, "InstanceNumber"))


def _sorted(study: StudyInfo) -> StudyInfo:
    """One order whatever the PACS answered in: series and instances by number, then UID."""
    def num(n: int | None) -> int:
        return n if n is not None else 1 << 30

    study.series.sort(key=lambda s: (num(s.SeriesNumber), s.SeriesInstanceUID))
    for s in study.series:
        s.instances.sort(key=lambda i: (num(i.InstanceNumber), i.SOPInstanceUID))
    return study


def study_dataset(study: StudyInfo) -> Dataset:
    """The study-level answer as a dataset again (the poll stores it as a FOUND unit, contract C1)."""
    ds = Dataset()
    for keyword in STUDY_KEYS:
        value: Any = getattr(study, keyword)
        if value is None:
            continue
        if keyword == "ModalitiesInStudy":
            value = list(value)
        elif keyword.startswith("NumberOf"):
            value = str(value)
        setattr(ds, keyword, value)
    return ds


def find_query(level: str, keys: tuple[str, ...], **match: str) -> Dataset:
    """A C-FIND identifier: every key asked for (empty: return it), the matching keys set."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(ds, keyword, match.get(keyword, ""))
    for keyword, value in match.items():
        setattr(ds, keyword, value)
    return ds


# -- C-FIND -------------------------------------------------------------------------------------
class CFindPacs:
    """Study Root C-FIND SCU; pynetdicom is blocking, so each question runs in a worker thread."""

    def __init__(self, host: str, port: int, aet: str, *, calling_aet: str = "ENGINE", timeout: float = 30.0):
        quiet_pynetdicom()
        self.host, self.port, self.aet = host, port, aet
        self.calling_aet = calling_aet
        self.timeout = timeout

    async def study(self, study_uid: str) -> StudyInfo | None:
        return await asyncio.to_thread(self._study, study_uid)

    async def find_studies(self, start: date, end: date) -> list[StudyInfo]:
        return await asyncio.to_thread(self._find_studies, start, end)

    async def close(self) -> None:
        pass

    def _associate(self) -> Any:
        # pynetdicom leaks its socket when the connect fails: find a PACS that is down ourselves first
        try:
            socket.create_connection((self.host, self.port), timeout=self.timeout).close()
        except OSError as exc:
            raise PacsError(f"PACS {self.aet} at {self.host}:{self.port} unreachable: {type(exc).__name__}") from None
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            raise PacsError(f"no association with the PACS {self.aet} at {self.host}:{self.port}")
        if assoc.dul.socket is not None:
            set_nodelay(assoc.dul.socket.socket)
        return assoc

    @staticmethod
    def _find(assoc: Any, query: Dataset) -> list[Dataset]:
        answers: list[Dataset] = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                raise PacsError(f"C-FIND at {query.QueryRetrieveLevel} level: no answer (timeout or abort)")
            code = int(status.Status)
            if code in PENDING:
                if identifier is not None:
                    answers.append(identifier)
            elif code != 0x0000:
                raise PacsError(f"C-FIND at {query.QueryRetrieveLevel} level failed with status 0x{code:04X}")
        return answers

    def _study(self, study_uid: str) -> StudyInfo | None:
        assoc = self._associate()
        try:
            answers = self._find(assoc, find_query("STUDY", STUDY_KEYS, StudyInstanceUID=study_uid))
            found = [a for a in answers if _text(a, "StudyInstanceUID") == study_uid]  # a PACS that ignored the key
            if not found:
                return None
            study = study_from(found[0])
            for ds in self._find(assoc, find_query("SERIES", SERIES_KEYS, StudyInstanceUID=study_uid)):
                series = series_from(ds)
                query = find_query("IMAGE", INSTANCE_KEYS, StudyInstanceUID=study_uid,
                               SeriesInstanceUID=series.SeriesInstanceUID)
                series.instances = [instance_from(i) for i in self._find(assoc, query)]
                study.series.append(series)
            return _sorted(study)
        finally:
            assoc.release()

    def _find_studies(self, start: date, end: date) -> list[StudyInfo]:
        assoc = self._associate()
        try:
            span = f"{start:%Y%m%d}-{end:%Y%m%d}"
            return [study_from(ds) for ds in self._find(assoc, find_query("STUDY", STUDY_KEYS, StudyDate=span))]
        finally:
            assoc.release()


# -- QIDO-RS ------------------------------------------------------------------------------------
class QidoPacs:
    """QIDO-RS (PS3.18 10.6): /studies, /studies/{uid}/series, /studies/{uid}/instances."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, client: httpx.AsyncClient | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.client = client or httpx.AsyncClient(timeout=timeout)
        self._own_client = client is None

    async def close(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def _get(self, path: str, params: dict[str, str], keys: tuple[str, ...]) -> list[JsonAnswer]:
        query: list[tuple[str, str | int | float | bool | None]] = [*params.items()]
        query += [("includefield", k) for k in keys]
        try:
            resp = await self.client.get(f"{self.base}/{path}", params=query,
                                         headers={"Accept": "application/dicom+json"})
        except httpx.TransportError as exc:
            raise PacsError(f"QIDO-RS {path.split('/')[-1]}: {type(exc).__name__}") from None
        if resp.status_code == 204 or (resp.status_code == 404 and "/" in path):
            return []
        if resp.status_code != 200:
            retry = resp.status_code >= 500 or resp.status_code in (408, 429)
            raise PacsError(f"QIDO-RS {path.split('/')[-1]}: HTTP {resp.status_code}", retry=retry)
        try:
            body = resp.json() if resp.content.strip() else []
            if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
                raise TypeError("not a list of objects")
            return [JsonAnswer(item) for item in body]
        except (ValueError, TypeError) as exc:
            raise PacsError(f"QIDO-RS {path.split('/')[-1]}: answer is not DICOM JSON ({type(exc).__name__})") from None

    async def study(self, study_uid: str) -> StudyInfo | None:
        answers = await self._get("studies", {"StudyInstanceUID": study_uid}, STUDY_KEYS)
        found = [a for a in answers if _text(a, "StudyInstanceUID") == study_uid]
        if not found:
            return None
        study = study_from(found[0])
        series_ds, instance_ds = await asyncio.gather(
            self._get(f"studies/{study_uid}/series", {}, SERIES_KEYS),
            self._get(f"studies/{study_uid}/instances", {}, INSTANCE_KEYS),
        )
        by_uid: dict[str, SeriesInfo] = {}
        for ds in series_ds:
            one = series_from(ds)
            by_uid[one.SeriesInstanceUID] = one
            study.series.append(one)
        for ds in instance_ds:
            series = by_uid.get(_text(ds, "SeriesInstanceUID"))
            if series is not None:  # an instance of a series the series query did not list yet: next time
                series.instances.append(instance_from(ds))
        return _sorted(study)

    async def find_studies(self, start: date, end: date) -> list[StudyInfo]:
        found = await self._get("studies", {"StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"}, STUDY_KEYS)
        return [study_from(ds) for ds in found]


def make_pacs(host: str, port: int, aet: str, qido_url: str = "", *, calling_aet: str = "ENGINE",
              timeout: float = 30.0) -> Pacs:
    """QIDO-RS when a URL is configured, else C-FIND."""
    if qido_url:
        return QidoPacs(qido_url, timeout=timeout)
    return CFindPacs(host, port, aet, calling_aet=calling_aet, timeout=timeout)
