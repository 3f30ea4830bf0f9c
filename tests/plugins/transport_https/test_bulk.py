"""The chunk uploader's blocking TLS connection (plugins/transport_https/bulk.py), against real
aiohttp servers over TLS: keep-alive, reconnection, and each verification failure by name."""

from __future__ import annotations

import asyncio

import pytest
import trustme
from aiohttp import web

from ossensor_plugins.transport_https.bulk import BulkConnection, BulkError, client_context
from tests.plugins.transport_https.test_transport_https import HOST, free_port, self_signed, serve, server_context


def echo_app(peers: list[int]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        peers.append(request.transport.get_extra_info("peername")[1])
        close = request.headers.get("X-Close") == "1"
        return web.json_response({"stored": len(body)},
                                 headers={"Connection": "close"} if close else None)

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/c", handler)
    return app


def test_keep_alive_and_reconnection_after_the_server_closes(tmp_path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    peers: list[int] = []

    async def scenario() -> None:
        async with serve(echo_app(peers), server_context(ca)) as port:
            bulk = BulkConnection(HOST, port, client_context(str(ca_file), "", True), "", 5.0)
            body = bytes(range(256)) * 8192  # 2 MiB
            for close in ("0", "0", "1", "0"):
                answer = await asyncio.to_thread(bulk.post, "/c", body, {"X-Close": close})
                assert (answer.status, answer.text) == (200, '{"stored": 2097152}')
            bulk.close()

    asyncio.run(scenario())
    # One connection for the first three requests; the server closed it after the third.
    assert peers[0] == peers[1] == peers[2] != peers[3]


def test_pinned_fingerprint_accepts_its_certificate_and_refuses_another(tmp_path) -> None:
    context, fingerprint = self_signed(tmp_path)
    pin = fingerprint.replace(":", "").lower()

    async def scenario() -> None:
        async with serve(echo_app([]), context) as port:
            good = BulkConnection(HOST, port, client_context("", pin, True), pin, 5.0)
            assert (await asyncio.to_thread(good.post, "/c", b"x", {})).status == 200
            wrong = BulkConnection(HOST, port, client_context("", "ab" * 32, True), "ab" * 32, 5.0)
            with pytest.raises(BulkError, match="pinned fingerprint") as info:
                await asyncio.to_thread(wrong.post, "/c", b"x", {})
            assert info.value.state == "tls"
            # Verification on, no pin: a self-signed certificate is not trusted.
            plain = BulkConnection(HOST, port, client_context("", "", True), "", 5.0)
            with pytest.raises(BulkError, match="not trusted") as info:
                await asyncio.to_thread(plain.post, "/c", b"x", {})
            assert info.value.state == "tls"

    asyncio.run(scenario())


def test_nothing_listening_is_unreachable() -> None:
    bulk = BulkConnection(HOST, free_port(), client_context("", "", False), "", 2.0)
    with pytest.raises(BulkError) as info:
        bulk.post("/c", b"x", {})
    assert info.value.state == "unreachable" and "refused" in str(info.value).lower()
