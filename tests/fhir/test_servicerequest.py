"""ORM^O01 / OMI^O23 -> ServiceRequest on the EMR: a second destination on ris-orders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient

kit = sys.modules["fhir_servers"]  # loaded by conftest.py (tests are not a package)
ROOT = Path(__file__).resolve().parents[2]

# the shipped channels/ris-orders.yaml has this destination (off unless EMR_ORDERS_ENABLED=true);
# a copy of its shape, for a channel file without it
EMR_DESTINATION = """
  - name: emr
    type: fhir
    types: [ORM^O01, OMI^O23]
    base_url: ${{EMR_FHIR_BASE:-http://127.0.0.1:8090/fhir}}
    mapping: {mapping}
    auth: {{type: "${{EMR_FHIR_AUTH:-bearer}}", token: "${{EMR_FHIR_TOKEN:-}}"}}
    stale_check: false
    identifier_systems:
      placer: ${{EMR_SYSTEM_PLACER:-urn:oid:1.2.3.4.5.3}}
      filler: ${{EMR_SYSTEM_FILLER:-urn:oid:1.2.3.4.5.4}}
      accession: ${{EMR_SYSTEM_ACCESSION:-urn:oid:1.2.3.4.5.11}}
      mrn: ${{EMR_SYSTEM_MRN:-urn:oid:1.2.3.4.5.1}}
      practitioner: ${{EMR_SYSTEM_PRACTITIONER:-urn:oid:1.2.3.4.5.5}}
"""


def channels_with_emr(tmp_path: Path) -> Path:
    folder = tmp_path / "channels"
    folder.mkdir()
    (folder / "ris-results.yaml").write_text((ROOT / "channels" / "ris-results.yaml").read_text())
    orders = (ROOT / "channels" / "ris-orders.yaml").read_text().rstrip("\n") + "\n"
    mapping = ROOT / "mappings" / "orm-to-servicerequest.yaml"
    if "type: fhir" not in orders:  # until the shipped channel has it
        orders += EMR_DESTINATION.format(mapping=mapping)
    (folder / "ris-orders.yaml").write_text(orders)
    return folder


async def test_order_and_its_cancel_update_one_servicerequest(sekmet: Any, engine_at: Any, tmp_path: Path) -> None:
    placer = "PL" + kit.uid()
    raw = (ROOT / "samples" / "hl7" / "orm_o01_ct.hl7").read_bytes()
    order = raw.replace(b"PL1001", placer.encode()).replace(b"ORM0001", kit.uid().encode())
    cancel = order.replace(b"ORC|NW|", b"ORC|CA|").replace(b"||SC||", b"||CA||")
    cancel = cancel.replace(order.split(b"|")[9], kit.uid().encode(), 1)  # a new MSH-10
    async with engine_at(sekmet.base_url, channels=channels_with_emr(tmp_path), EMR_ORDERS_ENABLED="true") as app:
        client = MLLPClient("127.0.0.1", app.port_of("ris-orders"), connect_timeout=5, read_timeout=30)
        try:
            replies = [await client.send(m) for m in (order, cancel)]
        finally:
            await client.close()
        assert [Message.parse(r).get("MSA-1") for r in replies] == ["AA", "AA"]
        rows = await kit.settled(app, 2)
    assert [r.state for r in rows] == ["done", "done"], [r.last_error for r in rows]
    [sr] = sekmet.search("ServiceRequest", identifier=f"urn:oid:1.2.3.4.5.3|{placer}")
    assert sr["status"] == "revoked" and sr["intent"] == "order"
    assert sr["code"]["coding"][0]["code"] == "CTHEAD"
    assert sr["subject"]["identifier"]["value"] == "100234"
    assert sr["occurrenceDateTime"] == "2026-11-25T10:00:00+01:00"
    assert [v["status"] for v in sekmet.history("ServiceRequest", sr["id"])] == ["revoked", "active"]
