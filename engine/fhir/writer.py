"""Writing one plan to the server, idempotently: a transaction Bundle or conditional updates.

Every resource is written by its identifier (`PUT Type?identifier=system|value`), so a resend, a
replay or a crash between the server's answer and our `done` updates what is there instead of
making a second one. `transaction` sends one Bundle per plan (all or nothing, `urn:uuid:`
references resolved by the server); `conditional` sends one request per resource in dependency
order (each idempotent, so a failure half-way is repaired by the retry).

Stale reports: before writing a DiagnosticReport the writer reads the one the server holds. When
that one was issued later (OBR-22, else MSH-7), or at the same time but as a correction, ours is
an older version that arrived late: nothing is written, and the outcome says so. Otherwise the
report is written with `If-Match` on the version just read, so a write that slipped in between
makes ours fail with 412 and be retried (read again, judged again) instead of overwriting it.
The delivery worker hands over a group of reports at once; their reads are sent together as one
search (`DiagnosticReport?identifier=a,b,c`, see `Lookups`), so the check costs the server one
search per group instead of one per report.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pydantic_core

from engine.fhir.client import FHIR_JSON, Answer, Auth, AuthError, judge, outcome_text
from engine.fhir.resources import Plan, Planned, identifier_key

Mode = Literal["transaction", "conditional"]
CORRECTED = frozenset({"corrected", "amended", "appended"})


@dataclass
class WriteResult:
    ok: bool
    retry: bool = False
    response: str = ""  # what the server answered (OperationOutcome text, locations)
    error: str = ""  # starts with "HTTP nnn" for an HTTP failure (the log shows only that)
    retry_after: float | None = None
    skipped: bool = False  # a stale report: not written, on purpose


class FhirWriter:
    """Writes plans; at most `parallel` requests in flight (the rest wait here, not in httpx's
    pool, whose bookkeeping per queued request doubled the engine's CPU time per delivery)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, auth: Auth, *, mode: Mode, guard_stale: bool,
                 parallel: int = 8, imaging_study_lookup: bool = False):
        self.client = client
        self.base = base_url.rstrip("/")
        self.auth = auth
        self.mode = mode
        self.guard_stale = guard_stale
        self.imaging_study_lookup = imaging_study_lookup
        self.slots = asyncio.Semaphore(parallel)
        self.lookups = Lookups(lambda url: self._send("GET", url))

    async def write(self, plan: Plan) -> WriteResult:
        try:
            versions: dict[str, tuple[str, str]] = {}
            checks = []
            if self.guard_stale:
                checks.append(self._check_stale(plan, versions))
            if self.imaging_study_lookup:
                checks.append(self._imaging_study(plan))
            for refused in await asyncio.gather(*checks):  # both reads at once (each grouped, see Lookups)
                if refused is not None:
                    return refused
            if self.mode == "transaction":
                return await self._transaction(plan, versions)
            return await self._conditional(plan, versions)
        except AuthError as exc:
            return WriteResult(ok=False, retry=exc.retry, error=f"authentication failed: {exc}")
        except httpx.TimeoutException as exc:
            return WriteResult(ok=False, retry=True, error=f"timed out (outcome unknown): {type(exc).__name__}")
        except httpx.TransportError as exc:
            return WriteResult(ok=False, retry=True, error=f"not delivered: {type(exc).__name__}")

    # -- requests ------------------------------------------------------------------------------
    async def _send(self, method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None,
                    if_match: bool = False) -> Answer:
        h = {"Accept": FHIR_JSON, **(await self.auth.headers(self.client)), **(headers or {})}
        content = None
        if body is not None:
            h["Content-Type"] = FHIR_JSON
            content = pydantic_core.to_json(body)  # encoded once, compact UTF-8
        async with self.slots:
            resp = await self.client.request(method, f"{self.base}/{url}", content=content, headers=h)
        ans = judge(resp, if_match=if_match)
        if ans.status == 401 and self.auth.refused():
            ans.retry = True  # an expired OAuth2 token: the next attempt fetches a new one
        return ans

    def _failed(self, what: str, ans: Answer) -> WriteResult:
        return WriteResult(
            ok=False,
            retry=ans.retry,
            retry_after=ans.retry_after,
            response=ans.text[:4000],
            error=f"HTTP {ans.status} on {what}: {ans.diagnostics}"[:2000],
        )

    # -- stale reports -------------------------------------------------------------------------
    async def _check_stale(self, plan: Plan, versions: dict[str, tuple[str, str]]) -> WriteResult | None:
        report = plan.first("DiagnosticReport")
        if report is None or not report.key:
            return None
        ans, found = await self.lookups.find("DiagnosticReport", report.key)
        if not ans.ok:
            return self._failed("DiagnosticReport search", ans)
        if len(found) != 1:
            return None  # none: created below; several: the conditional update says 412 itself
        current = found[0]
        if is_older(report.resource, current):
            return WriteResult(
                ok=True,
                skipped=True,
                response=(
                    f"not applied: DiagnosticReport/{current.get('id')} on the server is newer "
                    f"(status {current.get('status')}, issued {current.get('issued')}); this one is "
                    f"{report.resource.get('status')}, issued {report.resource.get('issued')}"
                ),
            )
        vid = (current.get("meta") or {}).get("versionId")
        if current.get("id") and vid:
            versions[report.key] = (str(current["id"]), str(vid))
        return None

    # -- the study of the report -------------------------------------------------------------
    async def _imaging_study(self, plan: Plan) -> WriteResult | None:
        """DiagnosticReport.imagingStudy: the EMR's ImagingStudy of the report's accession number.

        The RIS does not know the study's id on the EMR; the EMR does, by accession
        (`ImagingStudy?identifier=<accession system>|<accession>`). None found: the report goes
        without (the study may not have reached the EMR yet; a correction will pick it up).
        """
        report = plan.first("DiagnosticReport")
        accession = accession_key(report.resource) if report is not None else ""
        if report is None or not accession:
            return None
        ans, found = await self.lookups.find("ImagingStudy", accession)
        if not ans.ok:
            return self._failed("ImagingStudy search", ans)
        refs = report.resource.setdefault("imagingStudy", [])
        known = {r.get("reference") for r in refs if isinstance(r, dict)}
        for study in found:
            ref = f"ImagingStudy/{study.get('id')}"
            if study.get("id") and ref not in known:
                refs.append({"reference": ref})
                known.add(ref)
        if not refs:
            del report.resource["imagingStudy"]
        return None

    # -- transaction ---------------------------------------------------------------------------
    async def _transaction(self, plan: Plan, versions: dict[str, tuple[str, str]]) -> WriteResult:
        urns = {e.ref: f"urn:uuid:{uuid.uuid4()}" for e in plan.entries if e.key}
        entries = []
        for e in plan.entries:
            resource = replace_references(e.resource, urns)
            entry: dict[str, Any] = {"resource": resource, "request": self._request(e, versions, resource)}
            if e.key:
                entry["fullUrl"] = urns[e.ref]
            entries.append(entry)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        # return=minimal: the answer's entries say status and location, without the resources back
        ans = await self._send("POST", "", body=bundle, headers={"Prefer": "return=minimal"}, if_match=bool(versions))
        if not ans.ok:
            return self._failed("transaction", ans)
        return WriteResult(ok=True, response=_locations(ans.body))

    def _request(self, e: Planned, versions: dict[str, tuple[str, str]], resource: dict[str, Any]) -> dict[str, Any]:
        if e.create_only:
            return {"method": "POST", "url": e.type, "ifNoneExist": f"identifier={quote(e.key, safe='')}"}
        if e.key in versions:
            rid, vid = versions[e.key]
            resource["id"] = rid
            return {"method": "PUT", "url": f"{e.type}/{rid}", "ifMatch": f'W/"{vid}"'}
        if not e.key:
            return {"method": "POST", "url": e.type}
        return {"method": "PUT", "url": e.search}

    # -- conditional updates -------------------------------------------------------------------
    async def _conditional(self, plan: Plan, versions: dict[str, tuple[str, str]]) -> WriteResult:
        literal: dict[str, str] = {}
        written = []
        for e in plan.entries:
            resource = replace_references(e.resource, literal)
            unresolved = await self._resolve_conditional(resource, literal)
            if unresolved is not None:
                return unresolved
            resource = replace_references(resource, literal)
            if e.create_only:
                ans = await self._send("POST", e.type, body=resource,
                                       headers={"If-None-Exist": f"identifier={quote(e.key, safe='')}"})
            elif e.key in versions:
                rid, vid = versions[e.key]
                resource["id"] = rid
                ans = await self._send("PUT", f"{e.type}/{rid}", body=resource,
                                       headers={"If-Match": f'W/"{vid}"'}, if_match=True)
            elif e.key:
                ans = await self._send("PUT", e.search, body=resource)
            else:
                ans = await self._send("POST", e.type, body=resource)
            if not ans.ok:
                return self._failed(f"{e.type} write", ans)
            new_id = ans.body.get("id") if isinstance(ans.body, dict) else None
            if new_id:
                literal[e.ref] = f"{e.type}/{new_id}"
                written.append(f"{e.type}/{new_id} {ans.status}")
        return WriteResult(ok=True, response="; ".join(written))

    async def _resolve_conditional(self, resource: Any, literal: dict[str, str]) -> WriteResult | None:
        """Outside a transaction the server resolves no `Type?identifier=` reference: we do."""
        for ref in sorted(conditional_references(resource)):
            if ref in literal:
                continue
            rtype, _, query = ref.partition("?")
            name, _, value = query.partition("=")
            ans = await self._send("GET", f"{rtype}?{name}={quote(value, safe='')}")
            if not ans.ok:
                return self._failed(f"{rtype} search", ans)
            ids = [e["resource"]["id"] for e in (ans.body or {}).get("entry") or []
                   if isinstance(e, dict) and isinstance(e.get("resource"), dict) and e["resource"].get("id")]
            if len(ids) != 1:
                return WriteResult(ok=False, retry=len(ids) == 0,
                                   error=f"{rtype} reference matched {len(ids)} resources on the server")
            literal[ref] = f"{rtype}/{ids[0]}"
        return None


@dataclass
class _Wait:
    rtype: str
    key: str
    future: asyncio.Future[tuple[Answer, list[dict[str, Any]]]] = field(repr=False)


class Lookups:
    """Searches by identifier asked at the same moment, sent as one OR search per resource type.

    `find` answers what `Type?identifier=key` would: the server's answer and the resources it
    holds with that identifier. Keys asked in the same turn of the event loop (a delivery group
    starts together) share one `Type?identifier=k1,k2,...` search; a key with a character the
    search syntax escapes goes alone, and a server that refuses the combined search (a 4xx other
    than auth) is asked again one key at a time, so the answers are never worse than before.
    """

    def __init__(self, get: Callable[[str], Awaitable[Answer]], *, max_keys: int = 40) -> None:
        self.get = get
        self.max_keys = max_keys
        self._waiting: list[_Wait] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def find(self, rtype: str, key: str) -> tuple[Answer, list[dict[str, Any]]]:
        if not _groupable(key):
            return await self._one(rtype, key)
        loop = asyncio.get_running_loop()
        wait = _Wait(rtype, key, loop.create_future())
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append(wait)
        return await wait.future

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        by_type: dict[str, list[_Wait]] = {}
        for w in waiting:
            by_type.setdefault(w.rtype, []).append(w)
        for rtype, group in by_type.items():
            for i in range(0, len(group), self.max_keys):
                task = asyncio.create_task(self._answer(rtype, group[i : i + self.max_keys]))
                self._tasks.add(task)  # kept until done (the loop holds tasks only weakly)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, rtype: str, group: list[_Wait]) -> None:
        try:
            keys = sorted({w.key for w in group})
            if len(keys) == 1:
                answers = {keys[0]: await self._one(rtype, keys[0])}
            else:
                answers = await self._together(rtype, keys)
            for w in group:
                if not w.future.done():
                    w.future.set_result(answers[w.key])
        except BaseException as exc:  # a transport error or timeout is each delivery's to handle
            for w in group:
                if not w.future.done():
                    w.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def _one(self, rtype: str, key: str) -> tuple[Answer, list[dict[str, Any]]]:
        ans = await self.get(f"{rtype}?identifier={quote(key, safe='')}")
        return ans, _matches(ans, rtype) if ans.ok else []

    async def _together(self, rtype: str, keys: list[str]) -> dict[str, tuple[Answer, list[dict[str, Any]]]]:
        listed = ",".join(quote(k, safe="") for k in keys)
        ans = await self.get(f"{rtype}?identifier={listed}&_count={4 * len(keys) + 10}")
        complete = ans.ok and not any(
            isinstance(link, dict) and link.get("relation") == "next" for link in (ans.body or {}).get("link") or []
        )
        if not complete:
            if ans.retry or ans.status in (401, 403):
                return {k: (ans, []) for k in keys}  # the server is unwell or refuses us: the same for all
            singles = await asyncio.gather(*(self._one(rtype, k) for k in keys))  # not taken as one: one by one
            return dict(zip(keys, singles, strict=True))
        found: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        unmatched = False
        for resource in _matches(ans, rtype):
            idents = resource.get("identifier")
            if not isinstance(idents, list):
                idents = []
            hits = {identifier_key(i) for i in idents if isinstance(i, dict) and i.get("value")} & found.keys()
            for k in hits:
                found[k].append(resource)
            unmatched = unmatched or not hits
        answers = {k: (ans, found[k]) for k in keys}
        if unmatched:  # the server matches identifiers more loosely than we do: ask it about the rest
            rest = [k for k in keys if not found[k]]
            answers.update(zip(rest, await asyncio.gather(*(self._one(rtype, k) for k in rest)), strict=True))
        return answers


ACCESSION_TYPE = "ACSN"  # HL7 table 0203: accession ID


def accession_key(resource: dict[str, Any]) -> str:
    """`system|value` of the identifier typed ACSN (v2-0203), as the shipped mapping writes OBR-18."""
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        codings = (ident.get("type") or {}).get("coding") or [] if isinstance(ident.get("type"), dict) else []
        if any(isinstance(c, dict) and c.get("code") == ACCESSION_TYPE for c in codings):
            return identifier_key(ident)
    return ""


def _groupable(key: str) -> bool:
    """A key the OR list can carry as it is (`,` `$` `\\` and a second `|` would need escapes)."""
    return key.count("|") == 1 and not any(c in key for c in ",$\\")


def _matches(ans: Answer, rtype: str) -> list[dict[str, Any]]:
    entries = [e.get("resource") for e in (ans.body or {}).get("entry") or [] if isinstance(e, dict)]
    return [r for r in entries if isinstance(r, dict) and r.get("resourceType") == rtype]


def replace_references(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [replace_references(v, mapping) for v in node]
    if isinstance(node, dict):
        out = {k: replace_references(v, mapping) for k, v in node.items()}
        ref = node.get("reference")
        if isinstance(ref, str) and ref in mapping:
            out["reference"] = mapping[ref]
        return out
    return node


def conditional_references(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, list):
        for v in node:
            found |= conditional_references(v)
    elif isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "?" in ref and not ref.startswith(("http:", "https:", "urn:")):
            found.add(ref)
        for k, v in node.items():
            if k != "reference":
                found |= conditional_references(v)
    return found


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else None


def is_older(ours: dict[str, Any], current: dict[str, Any]) -> bool:
    """True when `ours` is an earlier version than what the server holds (and must not replace it)."""
    a, b = _instant(ours.get("issued")), _instant(current.get("issued"))
    if a is None or b is None:
        return False  # cannot tell: the last one sent wins, as without the check
    if a < b:
        return True
    return a == b and current.get("status") in CORRECTED and ours.get("status") not in CORRECTED


def _locations(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    out = []
    for e in body.get("entry") or []:
        resp = e.get("response") or {} if isinstance(e, dict) else {}
        out.append(f"{str(resp.get('location', '')).split('/_history')[0]} {resp.get('status', '')}".strip())
        if resp.get("outcome"):
            out.append(outcome_text(resp["outcome"]))
    return "; ".join(out)
