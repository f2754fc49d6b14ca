"""Talking to the EMR's FHIR server: authentication and what an HTTP answer means for a delivery.

Secrets are `SecretStr` (never in a repr, a log line or a stored error); the OAuth2 token is
cached until shortly before it expires and fetched again after a 401.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
import pydantic_core
from pydantic import BaseModel, ConfigDict, SecretStr

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class AuthConfig(BaseModel):
    """none | bearer (token, usually ${EMR_FHIR_TOKEN}) | basic | oauth2 (client credentials)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "bearer", "basic", "oauth2"] = "none"
    token: SecretStr = SecretStr("")
    username: str = ""
    password: SecretStr = SecretStr("")
    token_url: str = ""
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    scope: str = ""


class AuthError(Exception):
    """The credentials were refused or cannot be obtained; the text carries no secret."""

    def __init__(self, text: str, *, retry: bool) -> None:
        super().__init__(text)
        self.retry = retry


class Auth:
    """Adds the Authorization header; `refused()` after a 401 drops a cached token."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._token: str = ""
        self._expires: float = 0.0
        self._lock = asyncio.Lock()

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        cfg = self.config
        if cfg.type == "bearer":
            token = cfg.token.get_secret_value()
            return {"Authorization": f"Bearer {token}"} if token else {}
        if cfg.type == "basic":
            raw = f"{cfg.username}:{cfg.password.get_secret_value()}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
        if cfg.type == "oauth2":
            return {"Authorization": f"Bearer {await self._oauth2(client)}"}
        return {}

    def refused(self) -> bool:
        """Forget a cached OAuth2 token; True when there was one (a fresh one may be accepted)."""
        had = bool(self._token)
        self._token, self._expires = "", 0.0
        return had and self.config.type == "oauth2"

    async def _oauth2(self, client: httpx.AsyncClient) -> str:
        async with self._lock:  # one token request at a time; the others wait and reuse it
            if self._token and time.monotonic() < self._expires:
                return self._token
            cfg = self.config
            data = {"grant_type": "client_credentials"}
            if cfg.scope:
                data["scope"] = cfg.scope
            try:
                resp = await client.post(
                    cfg.token_url, data=data, auth=(cfg.client_id, cfg.client_secret.get_secret_value())
                )
            except httpx.TransportError as exc:
                raise AuthError(f"token endpoint unreachable: {type(exc).__name__}", retry=True) from None
            if resp.status_code != 200:
                retry = resp.status_code in RETRY_STATUSES
                raise AuthError(f"token endpoint answered HTTP {resp.status_code}", retry=retry)
            try:
                body = resp.json()
                token = str(body["access_token"])
            except (ValueError, KeyError, TypeError):
                raise AuthError("token endpoint answer has no access_token", retry=False) from None
            lifetime = float(body.get("expires_in") or 300)
            self._token = token
            self._expires = time.monotonic() + max(0.0, lifetime - min(30.0, lifetime / 10))
            return token


@dataclass
class Answer:
    """What the server said to one request, judged for the delivery queue."""

    status: int
    body: Any
    ok: bool
    retry: bool
    retry_after: float | None
    text: str  # the body as text (OperationOutcome) of a failure, for `engine messages show`; "" on success

    @property
    def diagnostics(self) -> str:
        return outcome_text(self.body) or self.text[:300]


def judge(resp: httpx.Response, *, if_match: bool = False) -> Answer:
    """2xx ok; 408/429/5xx (and 412 on a version we sent) retry, honouring Retry-After; other 4xx dead.

    The body is parsed once, from its bytes; its text is kept only for a failure (that is what
    `engine messages show` shows), not for every success.
    """
    status = resp.status_code
    content = resp.content
    body: Any = None
    if content.strip():
        try:
            body = pydantic_core.from_json(content)
        except ValueError:
            try:  # not UTF-8 JSON: let httpx find the charset
                body = resp.json()
            except (ValueError, json.JSONDecodeError):
                body = None
    ok = 200 <= status < 300
    retry = status in RETRY_STATUSES or (status == 412 and if_match)
    return Answer(status, body, ok, retry, retry_after(resp.headers.get("retry-after")), "" if ok else resp.text)


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome (or of a transaction-response's failed entry)."""
    if not isinstance(body, dict):
        return ""
    if body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        return "; ".join(
            str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code") or "")
            for i in issues
            if isinstance(i, dict)
        )
    return ""
