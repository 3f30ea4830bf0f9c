"""Strangers cost almost nothing (issue 15, item 3): a real vSensor behind its GuardedSite on
loopback over real TLS, driven by raw clients that misbehave the way the issue observed.

Each bound is a setting; these tests use short ones so they run in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from ossensor_vsensor.app import VSENSOR
from ossensor_vsensor.settings import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS

from ossensor_core.wire.names import H_VERSION, PATH_ANTIGENA, PATH_CHUNKS, PATH_REGISTER
from ossensor_core.wire.signing import sign
from tests.helpers.raw_tls import Guarded, closed_within, guarded, request_head, response
from tests.helpers.vsensor import KEY, SENSOR, settings

BIG = 64 << 20


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def run(coro):
    return asyncio.run(coro)


def test_four_unsigned_64_mib_uploads_are_refused_before_their_body(tmp_path, tls):
    """Was: the body was read before any header was checked (270 MB for four)."""
    sent: list[int] = []

    async def upload(g: Guarded) -> tuple[int, dict]:
        reader, writer = await g.open()
        writer.write(request_head("POST", PATH_CHUNKS, {"Content-Type": "x"}, BIG))
        answer = asyncio.ensure_future(response(reader))
        block, total = bytes(1 << 16), 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while total < BIG and not answer.done():
                writer.write(block)
                total += len(block)
                await writer.drain()
        sent.append(total)
        result = await answer
        writer.close()
        return result

    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            before, peak = rss_bytes(), 0
            started = time.monotonic()
            uploads = asyncio.gather(*(upload(g) for _ in range(4)))
            while not uploads.done():
                peak = max(peak, rss_bytes())
                await asyncio.sleep(0.01)
            answers = await uploads
            elapsed = time.monotonic() - started
            return answers, peak - before, elapsed

    answers, growth, elapsed = run(scenario())
    assert [status for status, _ in answers] == [401] * 4
    assert {answer["error"] for _, answer in answers} == {"missing_header"}
    # What each client got into the pipe before the refusal: socket buffers, not 64 MiB.
    assert max(sent) < 16 << 20, sent
    assert growth < 32 << 20, f"the process grew by {growth >> 20} MiB"
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("what", ["half headers", "nothing after TLS", "no TLS handshake"])
def test_a_client_that_stalls_is_closed_within_the_bound(tmp_path, tls, what):
    """Was: half its headers held a connection for minutes (still open after 200 s)."""
    async def scenario():
        vsettings = settings(tmp_path, header_seconds=1.0, handshake_seconds=1.0,
                             idle_seconds=30.0)
        async with guarded(vsettings, tls) as g:
            if what == "no TLS handshake":
                reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
                writer.write(b"\x16\x03\x01")  # the first bytes of a ClientHello, no more
            else:
                reader, writer = await g.open()
                if what == "half headers":
                    writer.write(b"POST /api/v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Oss")
            seconds = await closed_within(reader, 4.0)
            writer.close()
            assert g.app[VSENSOR].counts.total_connections == 0
            return seconds

    seconds = run(scenario())
    assert 0.8 < seconds < 3.0, seconds


def test_an_idle_keep_alive_connection_is_closed(tmp_path, tls):
    async def scenario():
        async with guarded(settings(tmp_path, idle_seconds=1.0), tls) as g:
            reader, writer = await g.open()
            writer.write(request_head("GET", "/status.json", {}))
            status, _ = await response(reader)
            assert status == 200
            seconds = await closed_within(reader, 4.0)
            writer.close()
            return seconds

    assert 0.8 < run(scenario()) < 3.0


def test_a_body_sent_one_byte_at_a_time_runs_out_of_time(tmp_path, tls):
    """Was: one body byte every 20 s held the connection. A stranger's is refused at its
    headers (its small body drained for a second at most); a key holder's gets 408
    body_timeout after ``body_seconds``."""
    body = b"x" * 1000

    async def trickle(g: Guarded, headers: dict[str, str]) -> tuple[int, dict, float]:
        reader, writer = await g.open()
        writer.write(request_head("POST", PATH_CHUNKS, {**headers, H_VERSION: "1",
                                                        "X-Ossensor-Chunk-Sequence": "1"},
                                  len(body)))
        started = time.monotonic()
        answer = asyncio.ensure_future(response(reader, timeout=10))
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for byte in body:
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.wait({answer}, timeout=0.3)
        status, data = await answer
        seconds = time.monotonic() - started
        await closed_within(reader, 2.0)
        writer.close()
        return status, data, seconds

    async def scenario():
        async with guarded(settings(tmp_path, body_seconds=1.5), tls) as g:
            stranger = await trickle(g, {})
            holder = await trickle(g, sign(KEY, "POST", PATH_CHUNKS, body, SENSOR))
            return stranger, holder

    stranger, holder = run(scenario())
    # A small body is drained for at most a second (auth.DRAIN_SECONDS), then the answer.
    assert (stranger[0], stranger[1]["error"]) == (401, "missing_header")
    assert stranger[2] < 1.6, stranger
    assert (holder[0], holder[1]["error"]) == (408, "body_timeout")
    assert 1.3 < holder[2] < 3.0, holder


def test_chunked_and_oversized_bodies_are_refused_from_the_headers(tmp_path, tls):
    async def scenario():
        async with guarded(settings(tmp_path, client_max_size=1 << 20), tls) as g:
            answers = []
            for extra, length in (({"Transfer-Encoding": "chunked"}, None),
                                  ({}, 2 << 20)):
                reader, writer = await g.open()
                writer.write(request_head("POST", PATH_REGISTER, {
                    **sign(KEY, "POST", PATH_REGISTER, b"", SENSOR), **extra}, length))
                answers.append(await response(reader))
                await closed_within(reader, 2.0)
                writer.close()
            return answers

    (chunked, large) = run(scenario())
    assert (chunked[0], chunked[1]["error"]) == (411, "length_required")
    assert (large[0], large[1]["error"]) == (413, "body_too_large")


@pytest.mark.parametrize("header, value, path, expected", [
    ("X-Ossensor-Sensor", b"n\xf6de-\xff", PATH_CHUNKS, (400, "bad_sensor_name")),
    ("X-Ossensor-Nonce", b"\xff" * 32, PATH_CHUNKS, (400, "bad_header")),
    ("Authorization", b"OSSENSOR-HMAC-SHA256 \xc3\x28\xff", PATH_CHUNKS, (400, "bad_header")),
    ("Authorization", b"Bearer \xff\xfe token", "/status.json", (401, None)),
])
def test_stray_bytes_in_a_header_or_token_get_a_4xx_and_one_log_line(
        tmp_path, tls, caplog, header, value, path, expected):
    """Was: 500 and a traceback in the log."""
    async def scenario():
        async with guarded(settings(tmp_path, admin_token="A-long-admin-token-1234"),
                           tls) as g:
            signed = sign(KEY, "POST", PATH_CHUNKS, b"", SENSOR)
            reader, writer = await g.open()
            method = "GET" if path == "/status.json" else "POST"
            writer.write(request_head(method, path, {**signed, header: value}, 0))
            answer = await response(reader)
            writer.close()
            return answer

    caplog.set_level(logging.INFO)
    status, answer = run(scenario())
    assert status == expected[0]
    if expected[1]:
        assert answer["error"] == expected[1]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == (1 if expected[1] else 0)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert KEY not in caplog.text


@pytest.mark.parametrize("body", [b'{"versions": [1], "addresses": [], "x": Infinity}',
                                  b'{"versions": [NaN]}', b'{"versions": [1e999]}',
                                  b'{"versions": [-Infinity]}'])
def test_non_finite_json_from_a_key_holder_gets_400(tmp_path, tls, caplog, body):
    """Was: 500."""
    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=g.client_ctx)) as session:
                headers = {H_VERSION: "1", **sign(KEY, "POST", PATH_REGISTER, body, SENSOR)}
                async with session.post(g.base + PATH_REGISTER, data=body,
                                        headers=headers) as r:
                    return r.status, await r.json()

    status, answer = run(scenario())
    assert status == 400 and answer["reason"] == "bad_json", answer
    assert not [r for r in caplog.records if r.exc_info]


def test_connections_are_capped_per_address_before_tls(tmp_path, tls):
    async def scenario():
        vsettings = settings(tmp_path, max_connections=5, max_connections_per_address=2)
        async with guarded(vsettings, tls) as g:
            counts = g.app[VSENSOR].counts
            first = [await g.open() for _ in range(2)]
            # A third from the same address is reset before any TLS: the handshake fails.
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                await g.open()
            # Other addresses still get in, up to the overall cap.
            others = [await g.open(f"127.0.0.{n}") for n in (2, 3, 4)]
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                await g.open("127.0.0.5")
            assert counts.total_connections == 5 and counts.refused_connections == 2
            # A closed connection frees its place.
            first[0][1].close()
            await asyncio.sleep(0.2)
            again = await g.open()
            again[0].feed_eof()
            for _, writer in [first[1], again, *others]:
                writer.close()
            await asyncio.sleep(0.2)
            assert counts.total_connections == 0 and not counts.connections

    run(scenario())


def test_the_default_caps_admit_5000_sensors_with_three_connections_each(tmp_path):
    from ossensor_vsensor.server import ConnectionCounts
    counts = ConnectionCounts(settings(tmp_path))
    assert MAX_CONNECTIONS >= 3 * 5000 and MAX_CONNECTIONS_PER_ADDRESS >= 3
    assert all(counts.admit_connection(f"10.{i >> 8}.{i & 255}.1")
               for i in range(5000) for _ in range(3))
    assert counts.total_connections == 15_000 and counts.refused_connections == 0


def test_requests_in_flight_are_capped(tmp_path, tls):
    async def scenario():
        vsettings = settings(tmp_path, max_requests_per_address=1, body_seconds=2.0)
        async with guarded(vsettings, tls) as g:
            # A key holder's request in flight (its body still coming) ...
            body = b'{"versions": [1]}'
            reader, writer = await g.open()
            writer.write(request_head("POST", PATH_REGISTER, {
                **sign(KEY, "POST", PATH_REGISTER, body, SENSOR)}, len(body)))
            await asyncio.sleep(0.3)
            # ... so a second from the same address waits for its turn: 503 busy.
            reader2, writer2 = await g.open()
            writer2.write(request_head("GET", "/status.json", {}))
            status, answer = await response(reader2)
            retry = answer
            writer.write(body)
            first = await response(reader)
            for w in (writer, writer2):
                w.close()
            return status, retry, first

    status, answer, first = run(scenario())
    assert (status, answer["error"]) == (503, "busy")
    assert first[0] == 200


def test_the_antigena_websocket_is_not_closed_as_idle(tmp_path, tls):
    async def scenario():
        vsettings = settings(tmp_path, idle_seconds=0.5, header_seconds=0.5)
        async with guarded(vsettings, tls) as g:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=g.client_ctx)) as session:
                headers = {H_VERSION: "1", **sign(KEY, "GET", PATH_ANTIGENA, b"", SENSOR)}
                async with session.ws_connect(g.base + PATH_ANTIGENA, headers=headers) as ws:
                    sync = await ws.receive_json(timeout=2)
                    assert sync["type"] == "sync"
                    with pytest.raises(asyncio.TimeoutError):
                        await ws.receive(timeout=2.0)  # quiet for four idle periods
                    assert not ws.closed
                    await ws.send_json({"type": "nothing"})
                    await asyncio.sleep(0.2)
                    assert not ws.closed

    run(scenario())


def test_a_stranger_costs_little_cpu_per_refused_request(tmp_path, tls):
    """The figure in docs/security.md: vSensor CPU per unsigned request refused (with a TLS
    handshake each, the dearest case), measured with the process's CPU clock."""
    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            count = 200
            cpu, wall = time.process_time(), time.monotonic()
            for _ in range(count):
                reader, writer = await g.open()
                writer.write(request_head("POST", PATH_CHUNKS, {}, BIG))
                assert (await response(reader))[0] == 401
                writer.close()
            return (time.process_time() - cpu) / count, (time.monotonic() - wall) / count

    per_request_cpu, per_request_wall = run(scenario())
    print(f"\nCPU (client and vSensor together) per refused stranger: "
          f"{per_request_cpu * 1e3:.2f} ms, wall {per_request_wall * 1e3:.2f} ms")
    assert per_request_cpu < 0.05


def test_ipv6_clients_are_counted_by_their_64():
    from ossensor_vsensor.server import client_key
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == \
        "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7" == client_key("192.0.2.7")


def test_a_refused_sender_of_a_small_body_gets_the_answer_not_a_reset(tmp_path, tls):
    """A sensor whose clock is off learns it from the 401 (``clock_skew`` and the vSensor's
    time), although the refusal comes before its body is read."""
    body = b"{" + b" " * 30_000 + b"}"

    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=g.client_ctx)) as session:
                headers = {H_VERSION: "1", **sign(KEY, "POST", PATH_REGISTER, body, SENSOR,
                                                  now=time.time() - 3600)}
                async with session.post(g.base + PATH_REGISTER, data=body,
                                        headers=headers) as r:
                    return r.status, await r.json()

    status, answer = run(scenario())
    assert (status, answer["error"]) == (401, "clock_skew")
    assert abs(answer["server_time"] - time.time()) < 30


def test_many_sensors_at_once_pass_the_gate(tmp_path, tls):
    """100 sensors from 100 addresses, each with its own connections, register, send chunks
    and open Antigena's websocket at once: every request answered, every count back to 0."""
    from tests.helpers.vsensor import make_chunk

    async def sensor(g, n: int) -> list[int]:
        name = f"node-{n}"
        connector = aiohttp.TCPConnector(ssl=g.client_ctx, local_addr=(f"127.0.1.{n}", 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses = []
            body = (b'{"versions": [1], "addresses": ["10.0.%d.%d"]}' % (n >> 8, n & 255))
            headers = {H_VERSION: "1", **sign(KEY, "POST", PATH_REGISTER, body, name)}
            async with session.post(g.base + PATH_REGISTER, data=body, headers=headers) as r:
                statuses.append(r.status)
            ws_headers = {H_VERSION: "1", **sign(KEY, "GET", PATH_ANTIGENA, b"", name)}
            async with session.ws_connect(g.base + PATH_ANTIGENA, headers=ws_headers) as ws:
                statuses.append(200 if (await ws.receive_json(timeout=10))["type"] == "sync"
                                else 0)
                for sequence in (1, 2):
                    chunk = g.app[VSENSOR].chunks.codec.encode(make_chunk(sequence, sensor=name))
                    headers = {H_VERSION: "1", "X-Ossensor-Chunk-Sequence": str(sequence),
                               **sign(KEY, "POST", PATH_CHUNKS, chunk, name)}
                    async with session.post(g.base + PATH_CHUNKS, data=chunk,
                                            headers=headers) as r:
                        statuses.append(r.status)
            return statuses

    async def scenario():
        async with guarded(settings(tmp_path, header_seconds=5.0), tls) as g:
            results = await asyncio.gather(*(sensor(g, n) for n in range(1, 101)))
            await asyncio.sleep(0.3)
            counts = g.app[VSENSOR].counts
            return results, counts.total_connections, counts.total_requests

    results, connections, requests = run(scenario())
    assert all(r == [200, 200, 200, 200] for r in results), results
    assert (connections, requests) == (0, 0)


@pytest.mark.parametrize("field", ["software", "interfaces", "instance"])
def test_json_strings_that_are_not_text_get_400(tmp_path, tls, caplog, field):
    """``"\\ud800"`` parses but is no character: it would break log lines and pages."""
    value = ["eth0", "\ud800"] if field == "interfaces" else "x\udcff"
    body = json.dumps({"versions": [1], "addresses": ["192.0.2.1"], field: value}).encode()

    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=g.client_ctx)) as session:
                headers = {H_VERSION: "1", **sign(KEY, "POST", PATH_REGISTER, body, SENSOR)}
                async with session.post(g.base + PATH_REGISTER, data=body,
                                        headers=headers) as r:
                    return r.status, await r.json()

    status, answer = run(scenario())
    assert (status, answer["reason"]) == (400, "bad_json")
    assert not [r for r in caplog.records if r.exc_info]


def test_stray_bytes_in_an_unsigned_protocol_header_get_400(tmp_path, tls):
    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            reader, writer = await g.open()
            writer.write(request_head("POST", PATH_REGISTER, {
                **sign(KEY, "POST", PATH_REGISTER, b"{}", SENSOR),
                "X-Ossensor-Instance": b"\xffinstance"}, 2) + b"{}")
            answer = await response(reader)
            writer.close()
            return answer

    status, answer = run(scenario())
    assert (status, answer["error"]) == (400, "bad_header")


def test_a_non_finite_number_on_the_antigena_websocket_is_logged_not_a_traceback(
        tmp_path, tls, caplog):
    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=g.client_ctx)) as session:
                headers = {H_VERSION: "1", **sign(KEY, "GET", PATH_ANTIGENA, b"", SENSOR)}
                async with session.ws_connect(g.base + PATH_ANTIGENA, headers=headers) as ws:
                    await ws.receive_json(timeout=2)
                    await ws.send_str('{"type": "report", "seq": Infinity}')
                    await asyncio.sleep(0.3)
                    assert not ws.closed

    run(scenario())
    assert "malformed Antigena message" in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_registrations_and_heartbeats_are_bounded_to_1_mib(tmp_path, tls):
    from ossensor_vsensor.registration import JSON_BODY_LIMIT
    body = b'{"versions": [1], "software": "' + b"x" * JSON_BODY_LIMIT + b'"}'

    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            reader, writer = await g.open()
            writer.write(request_head("POST", PATH_REGISTER, {
                **sign(KEY, "POST", PATH_REGISTER, body, SENSOR)}, len(body)))
            answer = await response(reader)
            writer.close()
            return answer

    status, answer = run(scenario())
    assert (status, answer["error"]) == (413, "body_too_large")
