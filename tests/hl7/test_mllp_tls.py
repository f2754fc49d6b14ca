"""MLLP over TLS and mutual TLS, with certificates made for the test (no keys are committed)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.hl7.mllp import (
    ConnInfo,
    MLLPClient,
    MLLPError,
    MLLPServer,
    client_ssl_context,
    frame,
    server_ssl_context,
    start_server,
)

WAIT = 10.0


async def echo(body: bytes, info: ConnInfo) -> bytes:
    subject = ""
    if info.peer_cert:
        subject = dict(x[0] for x in info.peer_cert["subject"]).get("commonName", "")
    return f"{info.tls}|{subject}|".encode() + body


@pytest.fixture
async def tls_server(pki: Any) -> AsyncIterator[MLLPServer]:
    ctx = server_ssl_context(pki.p("server.crt"), pki.p("server.key"))
    server = await start_server(echo, "127.0.0.1", 0, ssl=ctx, read_timeout=2)
    yield server
    await server.close()


@pytest.fixture
async def mtls_server(pki: Any) -> AsyncIterator[MLLPServer]:
    ctx = server_ssl_context(pki.p("server.crt"), pki.p("server.key"), ca=pki.p("ca.crt"), require_client_cert=True)
    server = await start_server(echo, "127.0.0.1", 0, ssl=ctx, read_timeout=2)
    yield server
    await server.close()


async def test_tls_round_trip(pki: Any, tls_server: MLLPServer) -> None:
    ctx = client_ssl_context(ca=pki.p("ca.crt"))
    async with MLLPClient("127.0.0.1", tls_server.port, ssl=ctx) as client:
        assert await client.send(b"MSH|x") == b"True||MSH|x"
        assert await client.send(b"again") == b"True||again"


async def test_client_refuses_an_untrusted_server(pki: Any, tls_server: MLLPServer) -> None:
    ctx = client_ssl_context(ca=pki.p("rogue-ca.crt"))
    client = MLLPClient("127.0.0.1", tls_server.port, ssl=ctx, connect_timeout=WAIT)
    with pytest.raises(MLLPError) as info:
        await client.send(b"MSH|x")
    assert not info.value.may_have_been_delivered
    await client.close()


async def test_plain_tcp_to_tls_port_does_not_disturb_tls_clients(pki: Any, tls_server: MLLPServer) -> None:
    good = MLLPClient("127.0.0.1", tls_server.port, ssl=client_ssl_context(ca=pki.p("ca.crt")))
    assert await good.send(b"1") == b"True||1"
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_server.port)
    writer.write(frame(b"MSH|plain"))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), WAIT)
    assert b"MSH" not in data  # never handled as MLLP; the handshake just fails
    writer.close()
    await writer.wait_closed()
    assert await good.send(b"2") == b"True||2"
    await good.close()


async def test_silent_peer_is_dropped_during_the_handshake(tls_server: MLLPServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_server.port)
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # handshake timeout (read_timeout)
    writer.close()
    await writer.wait_closed()


async def test_mutual_tls_accepts_a_client_with_a_proper_cert(pki: Any, mtls_server: MLLPServer) -> None:
    ctx = client_ssl_context(ca=pki.p("ca.crt"), cert=pki.p("client.crt"), key=pki.p("client.key"))
    async with MLLPClient("127.0.0.1", mtls_server.port, ssl=ctx) as client:
        assert await client.send(b"MSH|x") == b"True|ris.example|MSH|x"


@pytest.mark.parametrize("cert", [None, "rogue-client"])
async def test_mutual_tls_refuses_a_client_without_a_trusted_cert(
    pki: Any,
    mtls_server: MLLPServer,
    cert: str | None,
) -> None:
    good_ctx = client_ssl_context(ca=pki.p("ca.crt"), cert=pki.p("client.crt"), key=pki.p("client.key"))
    good = MLLPClient("127.0.0.1", mtls_server.port, ssl=good_ctx)
    assert await good.send(b"before") == b"True|ris.example|before"

    bad_ctx = client_ssl_context(
        ca=pki.p("ca.crt"), cert=pki.p(f"{cert}.crt") if cert else None, key=pki.p(f"{cert}.key") if cert else None
    )
    bad = MLLPClient("127.0.0.1", mtls_server.port, ssl=bad_ctx, read_timeout=WAIT)
    # Under TLS 1.3 the refusal may only show on the first read, so it surfaces from send().
    with pytest.raises(MLLPError):
        await bad.send(b"MSH|intruder")
    await bad.close()

    assert await good.send(b"after") == b"True|ris.example|after"
    assert mtls_server.connections == 1
    await good.close()


def test_require_client_cert_needs_a_ca(pki: Any) -> None:
    with pytest.raises(ValueError):
        server_ssl_context(pki.p("server.crt"), pki.p("server.key"), require_client_cert=True)


def test_contexts_refuse_old_protocols(pki: Any) -> None:
    server = server_ssl_context(pki.p("server.crt"), pki.p("server.key"), ca=pki.p("ca.crt"), require_client_cert=True)
    client = client_ssl_context(ca=pki.p("ca.crt"))
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
