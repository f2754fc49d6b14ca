"""A group of deliveries at once (as the delivery worker hands them over): one stale-check search
for the group, the same outcomes as one by one, and a server that refuses the combined search."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from engine.fhir.client import Auth, AuthConfig
from engine.fhir.resources import Plan
from engine.fhir.writer import FhirWriter, WriteResult
from engine.hl7.er7 import Message
from engine.mapping import load_mapping
from engine.runtime.destinations.fhir import FhirDestination, FhirDestinationConfig

kit = sys.modules["fhir_servers"]  # loaded by conftest.py (tests are not a package)
oru, uid = kit.oru, kit.uid

ROOT = Path(__file__).resolve().parents[2]
FILLER = "urn:oid:1.2.3.4.5.4"
MAPPING = load_mapping(ROOT / "mappings" / "oru-to-diagnosticreport.yaml")
DEST = FhirDestination(FhirDestinationConfig(name="emr", type="fhir", base_url="http://127.0.0.1:9/fhir",
                                             identifier_systems={"filler": FILLER}))


def plan(raw: bytes) -> Plan:
    [out] = MAPPING.run(Message.parse(raw))
    return DEST.plan(out)


def report_searches(proxy: Any) -> list[str]:
    return [unquote(path) for method, path, _ in proxy.requests if method == "GET" and "DiagnosticReport?" in path]


async def write_all(base_url: str, plans: list[Plan]) -> list[WriteResult]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=8)) as client:
        writer = FhirWriter(client, base_url, Auth(AuthConfig()), mode="transaction", guard_stale=True)
        return list(await asyncio.gather(*(writer.write(p) for p in plans)))


async def test_a_group_is_checked_with_one_search_and_a_late_final_still_stays_out(sekmet: Any) -> None:
    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"))
    await proxy.start()
    late = uid()
    others = [uid() for _ in range(5)]
    try:
        [first] = await write_all(proxy.base_url, [plan(oru(uid(), filler=late, status="C", issued="20261125130000"))])
        assert first.ok and not first.skipped, first.error
        proxy.requests.clear()
        results = await write_all(proxy.base_url, [plan(oru(uid(), filler=late))] +
                                  [plan(oru(uid(), filler=f, mrn=f"M{f}")) for f in others])
    finally:
        await proxy.stop()
    assert results[0].ok and results[0].skipped and "newer" in results[0].response
    assert all(r.ok and not r.skipped for r in results[1:]), [r.error for r in results]
    [search] = report_searches(proxy)  # one search for the six reports
    assert all(f"{FILLER}|{f}" in search for f in [late, *others])
    [report] = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{late}")
    assert report["status"] == "corrected"
    for f in others:
        assert len(sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{f}")) == 1


async def test_a_server_that_refuses_the_combined_search_is_asked_one_by_one(sekmet: Any) -> None:
    def refuse_lists(method: str, path: str) -> str | None:
        return "400" if method == "GET" and "," in unquote(path) else None

    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"), fault_when=refuse_lists)
    await proxy.start()
    late = uid()
    others = [uid() for _ in range(3)]
    try:
        await write_all(proxy.base_url, [plan(oru(uid(), filler=late, status="C", issued="20261125130000"))])
        proxy.requests.clear()
        results = await write_all(proxy.base_url, [plan(oru(uid(), filler=late))] +
                                  [plan(oru(uid(), filler=f, mrn=f"M{f}")) for f in others])
    finally:
        await proxy.stop()
    assert results[0].ok and results[0].skipped  # the stale check still held
    assert all(r.ok and not r.skipped for r in results[1:]), [r.error for r in results]
    searches = report_searches(proxy)
    assert len(searches) == 5 and "," in searches[0]  # refused, then one per report
    assert [f for _, _, f in proxy.requests].count("400") == 1
    for f in others:
        assert len(sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{f}")) == 1


async def test_an_unwell_server_fails_the_whole_group_for_a_retry(sekmet: Any) -> None:
    def unwell(method: str, path: str) -> str | None:
        return "503" if method == "GET" else None

    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"), fault_when=unwell)
    await proxy.start()
    fillers = [uid() for _ in range(3)]
    try:
        results = await write_all(proxy.base_url, [plan(oru(uid(), filler=f, mrn=f"M{f}")) for f in fillers])
    finally:
        await proxy.stop()
    assert all(not r.ok and r.retry and r.retry_after == 1 for r in results)
    assert len(report_searches(proxy)) == 1  # asked once, not once per report
    assert all(sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{f}") == [] for f in fillers)
