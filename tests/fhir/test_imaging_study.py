"""DiagnosticReport.imagingStudy "when the engine knows it": with `imaging_study_lookup: true` the
destination asks the EMR for the ImagingStudy of the report's accession number at delivery."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx

kit = sys.modules["fhir_servers"]  # loaded by conftest.py (tests are not a package)
oru, send, settled, uid = kit.oru, kit.send, kit.settled, kit.uid

FILLER = "urn:oid:1.2.3.4.5.4"
ACCESSION = "urn:oid:1.2.3.4.5.11"


def channels_without_lookup(tmp_path: Path) -> Path:
    """The shipped ris-results (which looks studies up) with `imaging_study_lookup: false`."""
    channels = tmp_path / "channels"
    channels.mkdir()
    text = (kit.ROOT / "channels" / "ris-results.yaml").read_text()
    anchor = "    imaging_study_lookup: true"
    assert anchor in text
    text = text.replace(anchor, "    imaging_study_lookup: false")
    (channels / "ris-results.yaml").write_text(text)
    return channels


def imaging_study(sekmet: Any, accession: str) -> str:
    """An ImagingStudy on the EMR, as the PACS (or the engine's pacs-studies channel) would put it there."""
    resp = httpx.post(f"{sekmet.base_url}/ImagingStudy", headers={"Content-Type": "application/fhir+json"}, json={
        "resourceType": "ImagingStudy", "status": "available",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                              "code": "ACSN"}]}, "system": ACCESSION, "value": accession}],
        "subject": {"identifier": {"system": "urn:oid:1.2.3.4.5.1", "value": "100234"}},
    }, timeout=30)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def test_the_report_references_the_study_of_its_accession(sekmet: Any, engine_at: Any) -> None:
    with_study, without = uid(), uid()
    study_id = imaging_study(sekmet, "ACC" + with_study)
    async with engine_at(sekmet.base_url) as app:  # the shipped channel looks studies up
        await send(app, oru(uid(), filler=with_study, accession="ACC" + with_study),
                   oru(uid(), filler=without, accession="ACC" + without))
        rows = await settled(app, 2)
    assert [r.state for r in rows] == ["done", "done"], [r.last_error for r in rows]
    [report] = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{with_study}")
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study_id}"}]
    [other] = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{without}")
    assert "imagingStudy" not in other  # no study on the EMR (yet): the report goes without


async def test_without_the_option_no_study_is_looked_up(sekmet: Any, engine_at: Any, tmp_path: Path) -> None:
    filler = uid()
    imaging_study(sekmet, "ACC" + filler)
    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"))
    await proxy.start()
    try:
        async with engine_at(proxy.base_url, channels=channels_without_lookup(tmp_path)) as app:
            await send(app, oru(uid(), filler=filler, accession="ACC" + filler))
            [row] = await settled(app, 1)
    finally:
        await proxy.stop()
    assert row.state == "done", row.last_error
    assert not any("ImagingStudy" in path for _, path, _ in proxy.requests)
    [report] = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}")
    assert "imagingStudy" not in report
