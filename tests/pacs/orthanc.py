"""A real Orthanc started for the tests, and DICOM instances built with pydicom to load into it.

Orthanc runs on free DICOM and HTTP ports with a temporary JSON configuration: its own storage
folder, the DICOMweb plugin (QIDO-RS at /dicom-web/), no authentication, HTTP refused from other
hosts, C-FIND accepted from any AE title. (Orthanc 1.10 cannot bind its DICOM port to one address;
the port is free and the test is short.) Instances go in over its REST API (POST /instances).
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")
AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def qido_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "engine-tests",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowStore": True,
            "TcpNoDelay": True,
            "StorageCompression": False,
            "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags"},
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        with open(self.folder / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=log, cwd=self.folder)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "orthanc.log").read_text(errors="replace")[-3000:])
            try:
                if self.http.get("/system").status_code == 200:
                    with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                        return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def store(self, ds: Dataset) -> None:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        resp = self.http.post("/instances", content=buf.getvalue(), headers={"Content-Type": "application/dicom"})
        resp.raise_for_status()

    def store_all(self, datasets: list[Dataset]) -> None:
        for ds in datasets:
            self.store(ds)

    def instance_count(self, study_uid: str) -> int:
        resp = self.http.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        resp.raise_for_status()
        return len(resp.json())


_TEMPLATES: dict[str, Dataset] = {}


def _template(modality: str) -> Dataset:
    name = {"CT": "CT_small.dcm", "MR": "MR_small.dcm"}.get(modality, "CT_small.dcm")
    if name not in _TEMPLATES:
        path = get_testdata_file(name)
        assert path is not None
        _TEMPLATES[name] = dcmread(path)
    return _TEMPLATES[name]


@dataclass
class SeriesPlan:
    modality: str = "CT"
    instances: int = 3
    description: str = "AXIAL"
    body_part: str = "CHEST"
    laterality: str = ""
    number: int = 1
    uid: str = field(default_factory=generate_uid)
    instance_uids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.instance_uids:
            self.instance_uids = [generate_uid() for _ in range(self.instances)]


@dataclass
class StudyPlan:
    """What one study holds; `datasets()` builds its instances (each a copy of a pydicom test file)."""

    accession: str
    patient_id: str
    patient_name: str = "DOE^JANE"
    study_date: str = "20261201"
    study_time: str = "101500"
    description: str = "CT CHEST"
    referring: str = "HOUSE^GREGORY"
    series: list[SeriesPlan] = field(default_factory=lambda: [SeriesPlan()])
    uid: str = field(default_factory=generate_uid)

    def datasets(self, series: list[SeriesPlan] | None = None) -> list[Dataset]:
        out = []
        for s in series if series is not None else self.series:
            for n, iuid in enumerate(s.instance_uids, 1):
                ds = copy.deepcopy(_template(s.modality))
                ds.StudyInstanceUID = self.uid
                ds.SeriesInstanceUID = s.uid
                ds.SOPInstanceUID = iuid
                ds.file_meta.MediaStorageSOPInstanceUID = iuid
                ds.AccessionNumber = self.accession
                ds.PatientID = self.patient_id
                ds.IssuerOfPatientID = "HOSP"
                ds.PatientName = self.patient_name
                ds.StudyDate, ds.StudyTime = self.study_date, self.study_time
                ds.SeriesDate, ds.SeriesTime = self.study_date, self.study_time
                ds.StudyDescription = self.description
                ds.ReferringPhysicianName = self.referring
                ds.Modality = s.modality
                ds.SeriesDescription = s.description
                ds.BodyPartExamined = s.body_part
                if s.laterality:
                    ds.Laterality = s.laterality
                ds.SeriesNumber = s.number
                ds.InstanceNumber = n
                ds.StudyID = "1"
                out.append(ds)
        return out

    def payload(self, series: list[SeriesPlan] | None = None, **extra: Any) -> dict[str, Any]:
        """A C3 study payload as the `steps` destination queues it after MPPS COMPLETED."""
        listed = series if series is not None else self.series
        body: dict[str, Any] = {
            "source": "mpps", "study_instance_uid": self.uid, "accession_number": self.accession,
            "accession_issuer": "", "patient_id": self.patient_id, "patient_issuer": "HOSP",
            "patient_name": self.patient_name, "requested_procedure_id": "RP1", "placer_order": f"P{self.accession}",
            "filler_order": f"F{self.accession}", "referring_physician": self.referring,
            "requested_procedure_description": self.description,
            "procedure_code": [{"code": "CTCHEST", "system": "urn:oid:1.2.3.4.5.99", "display": "CT chest"}],
            "started": self.study_date + self.study_time, "performers": ["TECH^TOM"], "station_aet": "CT01",
            "performed_series": [
                {"series_instance_uid": s.uid, "modality": s.modality, "series_description": s.description,
                 "performer": "TECH^TOM", "protocol_name": "CHEST",
                 "instances": [{"sop_instance_uid": u, "sop_class_uid": _template(s.modality).SOPClassUID}
                               for u in s.instance_uids]}
                for s in listed
            ],
            "mpps_sop_instance_uid": generate_uid(), "status": "COMPLETED",
        }
        body.update(extra)
        return body
