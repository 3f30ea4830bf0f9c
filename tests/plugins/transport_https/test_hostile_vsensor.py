"""The https transport against a hostile or broken vSensor (or a load balancer in front of it).

A real aiohttp server over TLS (trustme) that checks every signature and answers what the
issue lists: ``Retry-After`` of 0, -1, NaN, a past date or 10^9; 413 for bodies over a size;
numbers out of any sane range in its registration answer; filters and peer ranges that cannot
be applied. The sensor must never retry in a tight loop (requests are counted per second),
every packet must arrive, and what it cannot apply it refuses whole and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

import pytest
import trustme
from aiohttp import web

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.errors import FilterError
from ossensor_core.node.interfaces import Interface
from ossensor_core.pipeline.config import CHUNK_BYTES_MAX, read_core_config
from ossensor_core.pipeline.contracts import CaptureStats, Chunk
from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.wire.names import (HEARTBEAT_SECONDS_MAX, HEARTBEAT_SECONDS_MIN,
                                      MAX_CHUNK_BYTES, MAX_PEER_RANGES)
from ossensor_core.wire.signing import (PATH_CHUNKS, PATH_HEARTBEAT, PATH_REGISTER, AuthError,
                                        NonceCache, verify)
from ossensor_plugins.transport_https import HttpsTransport
from ossensor_plugins.transport_https.answers import (RETRY_AFTER_CAP, RETRY_AFTER_FLOOR,
                                                      retry_after)
from ossensor_plugins.transport_https.registration import heartbeat_interval
from tests.helpers.own_filter import vsensor_parts

KEY = "Kx9secretHMACkey42-hostile"
SENSOR = "node-1"
HOST = "127.0.0.1"


class RecordingControl:
    """The sensor's side of the filter: records what is applied; 'bad' fails like libpcap."""

    @property
    def applied(self) -> list[tuple[str, AddressSet | None]]:
        """The vSensor's part of each filter applied (``tests/helpers/own_filter.py``)."""
        return list(zip(vsensor_parts([e for e, _ in self.calls]),
                        [p for _, p in self.calls[1:]]))

    def __init__(self) -> None:
        self.calls: list[tuple[str, AddressSet | None]] = []

    def set_vsensor_filter(self, expression: str, peers: AddressSet | None = None) -> str:
        if "bad" in expression:
            raise FilterError(f"syntax error in {expression!r}")
        self.calls.append((expression, peers))
        return ""

    def filter_note(self) -> str:
        return ""

    def capture_stats(self) -> dict[str, CaptureStats]:
        return {"eth0": CaptureStats(packets=1, drops=0)}

    def captured_interfaces(self) -> list[Interface]:
        return [Interface("eth0", 2, 1, 0x1, ("192.0.2.10",))]


class HostileVSensor:
    """Checks every signature; ``register_answer`` and ``heartbeat_answer`` are what it says,
    ``chunk_answers`` scripts (status, headers) before storing, ``max_body`` answers 413 to
    larger chunk bodies (as a proxy would, without reading them)."""

    def __init__(self) -> None:
        self.nonces = NonceCache(300)
        self.register_answer: dict[str, Any] = {"version": 1, "heartbeat_seconds": 30,
                                                "filter": "not port 1"}
        self.heartbeat_answer: dict[str, Any] = {}
        self.chunk_answers: list[tuple[int, dict[str, str]]] = []
        self.max_body = MAX_CHUNK_BYTES
        self.codec = ChunkCodec()
        self.stored: dict[int, Chunk] = {}
        self.attempts: list[tuple[float, int, int]] = []  # (time, sequence, status)
        self.heartbeats: list[tuple[float, dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_CHUNK_BYTES)
        app.router.add_post(PATH_REGISTER, self.register)
        app.router.add_post(PATH_HEARTBEAT, self.heartbeat)
        app.router.add_post(PATH_CHUNKS, self.chunks)
        return app

    async def _verified(self, request: web.Request) -> bytes:
        body = await request.read()
        try:
            verify([KEY], request.method, request.path_qs, request.headers, body, self.nonces)
        except AuthError as exc:
            raise web.HTTPUnauthorized(text=str(exc)) from None
        return body

    async def register(self, request: web.Request) -> web.Response:
        await self._verified(request)
        return web.Response(text=json.dumps(self.register_answer),  # NaN too, as Python does
                            content_type="application/json")

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats.append((time.monotonic(), json.loads(await self._verified(request))))
        return web.Response(text=json.dumps(self.heartbeat_answer),
                            content_type="application/json")

    async def chunks(self, request: web.Request) -> web.Response:
        sequence = int(request.headers["X-Ossensor-Chunk-Sequence"])
        if (request.content_length or 0) > self.max_body:
            self.attempts.append((time.monotonic(), sequence, 413))
            return web.json_response({"error": "body_too_large"}, status=413)
        body = await self._verified(request)
        if self.chunk_answers:
            status, headers = self.chunk_answers.pop(0)
            self.attempts.append((time.monotonic(), sequence, status))
            return web.json_response({"error": f"scripted {status}"}, status=status,
                                     headers=headers)
        self.attempts.append((time.monotonic(), sequence, 200))
        chunk = self.codec.decode(body)
        assert chunk.sequence == sequence
        self.stored.setdefault(sequence, chunk)
        return web.json_response({"stored": chunk.packets})

    def frames(self) -> set[bytes]:
        """Every frame stored, over all chunks."""
        return {p.data for c in self.stored.values() for b in c.batches for p in b.packets()}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def serving(server: HostileVSensor, ca: trustme.CA, control: RecordingControl,
                  **options: Any) -> AsyncIterator[HttpsTransport]:
    """The server, and a started transport that trusts its CA (closed after)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=context)
    await site.start()
    with ca.cert_pem.tempfile() as ca_file:
        settings: dict[str, Any] = dict(timeout_seconds=2.0, grace_seconds=0.5,
                                        backoff_min=0.05, backoff_max=0.2)
        settings.update(options)
        sender = HttpsTransport(HOST, runner.addresses[0][1], KEY, SENSOR, ChunkCodec(),
                                ca_file=ca_file, **settings)
        try:
            await sender.start(control)
            yield sender
        finally:
            await sender.aclose()
            await runner.cleanup()


def chunk(sequence: int, batches: int, records: int, size: int) -> Chunk:
    """Random (incompressible) records, each unique."""
    made = []
    for b in range(batches):
        frames = [(1_700_000_000_000_000_000 + (b * records + i) * 1000, size,
                   sequence.to_bytes(4, "big") + bytes([b, i]) + os.urandom(size - 6))
                  for i in range(records)]
        made.append(PacketBatch.from_frames("eth0", 2, 1, frames))
    return Chunk(SENSOR, sequence, tuple(made), time.time_ns())


def sent_frames(chunks: list[Chunk]) -> set[bytes]:
    return {p.data for c in chunks for b in c.batches for p in b.packets()}


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def most_per_second(times: list[float]) -> int:
    """The most requests in any one-second window."""
    return max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)


# Retry-After -----------------------------------------------------------------------------------

def test_retry_after_is_parsed_strictly_with_a_floor_and_a_cap() -> None:
    floor, cap = RETRY_AFTER_FLOOR, RETRY_AFTER_CAP
    assert (floor, cap) == (1.0, 300.0)
    past = formatdate(time.time() - 3600, usegmt=True)
    for value in ("0", "-1", "NaN", "inf", "1.5", "1e9", "soon", "", " ", past, "0x10",
                  "Mon, 99 Foo 2026 99:99:99 GMT", "Thu, 01 Jan 1970 00:00:00", "٣"):
        assert retry_after(value) == floor, value
    for value in ("1000000000", "9" * 40, formatdate(time.time() + 10 ** 7, usegmt=True)):
        assert retry_after(value) == cap, value
    assert retry_after("7") == retry_after(" 7 ") == 7.0
    assert 25 <= retry_after(formatdate(time.time() + 30, usegmt=True)) <= 31
    assert retry_after(None) is None


def test_hostile_retry_after_never_makes_a_tight_loop_and_every_packet_arrives(ca) -> None:
    server = HostileVSensor()
    past = formatdate(time.time() - 86400, usegmt=True)
    server.chunk_answers = [(503, {"Retry-After": v}) for v in ("0", "-1", "NaN", past, "x")]
    chunks = [chunk(1, 2, 5, 200), chunk(2, 1, 3, 300)]

    async def scenario() -> None:
        async with serving(server, ca, RecordingControl()) as sender:
            for c in chunks:
                await sender.send(c)
            await wait_until(lambda: len(server.stored) == 2)
    asyncio.run(scenario())
    times = [t for t, _, _ in server.attempts]
    gaps = [b - a for a, b in zip(times, times[1:6])]
    print(f"\nRetry-After 0/-1/NaN/past/garbage: {len(times)} chunk requests, gaps "
          f"{', '.join(f'{g:.2f}' for g in gaps)} s, at most {most_per_second(times)} per second")
    assert [s for _, _, s in server.attempts] == [503] * 5 + [200, 200]
    assert all(gap >= RETRY_AFTER_FLOOR - 0.05 for gap in gaps), gaps
    assert most_per_second(times) <= 2
    assert server.frames() == sent_frames(chunks)


def test_a_huge_retry_after_waits_the_cap_not_forever_and_not_at_once(ca) -> None:
    server = HostileVSensor()
    server.chunk_answers = [(503, {"Retry-After": "1000000000"})]

    async def scenario() -> HttpsTransport:
        async with serving(server, ca, RecordingControl()) as sender:
            await sender.send(chunk(1, 1, 2, 100))
            await wait_until(lambda: len(server.attempts) == 1)
            await asyncio.sleep(1.5)
            return sender
    sender = asyncio.run(scenario())
    assert len(server.attempts) == 1  # waiting (RETRY_AFTER_CAP), not hammering
    assert sender.chunk_retries == 1


# 413 -----------------------------------------------------------------------------------------------

def test_413_splits_the_chunk_until_every_packet_arrives_and_never_blocks_the_queue(ca,
                                                                                caplog) -> None:
    server = HostileVSensor()
    server.max_body = 2500  # a proxy's limit far below the vSensor's
    chunks = [chunk(1, 4, 6, 300),  # four batches of 1.8 KB: halves of batches, then records
              chunk(2, 1, 8, 400),  # one batch: halves of its records
              chunk(3, 1, 1, 3000),  # one record over the limit: dropped, counted, logged
              chunk(4, 1, 2, 200)]  # behind it: arrives

    async def scenario() -> HttpsTransport:
        async with serving(server, ca, RecordingControl()) as sender:
            for c in chunks:
                await sender.send(c)
            await wait_until(lambda: sender.queued_chunks == 0 and sender._in_flight is None
                             and 4 in server.stored)
            return sender
    sender = asyncio.run(scenario())
    refused = [a for a in server.attempts if a[2] == 413]
    times = [t for t, _, _ in server.attempts]
    print(f"\n413 over {server.max_body} bytes: {len(server.attempts)} chunk requests "
          f"({len(refused)} refused), {sender.chunks_split} splits, {len(server.stored)} chunks "
          f"stored, at most {most_per_second(times)} requests in a second")
    assert server.frames() == sent_frames([chunks[0], chunks[1], chunks[3]])
    assert sender.records_too_large == 1 and sender.packets_dropped == 1
    assert sender.chunks_dropped == 1
    assert "single record" in caplog.text and "cannot be split" in caplog.text
    # Every part was acknowledged: each stored sequence was answered 200 once.
    assert sorted(s for _, s, st in server.attempts if st == 200) == sorted(server.stored)
    assert all(s >= 1 << 63 for s in server.stored if s not in (4,))  # parts: their own range
    assert len(server.attempts) <= 40  # log2 rounds per chunk, no retry loop


def test_chunk_bytes_has_a_maximum_below_the_vsensor_body_limit() -> None:
    assert CHUNK_BYTES_MAX < MAX_CHUNK_BYTES
    env = {"VSENSOR_HOSTNAME": "vsensor.test", "VSENSOR_HMAC_KEY": KEY}
    config, problems = read_core_config({**env, "OSSENSOR_CHUNK_BYTES": str(CHUNK_BYTES_MAX)})
    assert not problems and config.chunk_bytes == CHUNK_BYTES_MAX
    _, problems = read_core_config({**env, "OSSENSOR_CHUNK_BYTES": str(MAX_CHUNK_BYTES)})
    assert len(problems) == 1 and problems[0].startswith("OSSENSOR_CHUNK_BYTES")
    assert KEY not in problems[0]


# Numbers, filters and ranges from the vSensor ----------------------------------------------------

def test_heartbeat_interval_is_bounded() -> None:
    for value, expected in ((0, HEARTBEAT_SECONDS_MIN), (-5, HEARTBEAT_SECONDS_MIN),
                            (1e-9, HEARTBEAT_SECONDS_MIN), (1e300, HEARTBEAT_SECONDS_MAX),
                            (7, 7.0), (2.5, 2.5)):
        assert heartbeat_interval(value, 10.0) == expected, value
    for value in (float("nan"), float("inf"), True, "5", None, [1], {"a": 1}):
        assert heartbeat_interval(value, 10.0) == 10.0, value


@pytest.mark.parametrize("seconds", [0, 1e-9, -1, float("nan"), float("inf")])
def test_hostile_heartbeat_seconds_make_no_tight_loop(ca, seconds) -> None:
    server = HostileVSensor()
    server.register_answer = {**server.register_answer, "heartbeat_seconds": seconds}

    async def scenario() -> None:
        async with serving(server, ca, RecordingControl()):
            await asyncio.sleep(2.0)
    asyncio.run(scenario())
    times = [t for t, beat in server.heartbeats if not beat.get("leaving")]
    print(f"\nheartbeat_seconds {seconds}: {len(times)} heartbeats in 2 s")
    assert most_per_second(times) <= 1 / HEARTBEAT_SECONDS_MIN + 1
    if seconds != seconds or seconds == float("inf"):  # ignored: the sensor's own 10 s
        assert not times


def test_a_version_that_is_not_an_integer_is_refused(ca, caplog) -> None:
    server = HostileVSensor()
    server.register_answer = {**server.register_answer, "version": True}

    async def scenario() -> HttpsTransport:
        async with serving(server, ca, RecordingControl()) as sender:
            await asyncio.sleep(0.5)
            return sender
    assert not asyncio.run(scenario()).registered
    assert "protocol version True" in caplog.text


BAD_SETS: list[tuple[str, Any, Any]] = [
    ("filter that does not compile", "bad filter", None),
    ("filter of another type", ["not port 1"], None),
    ("filter too long", "not port 1 " * 30000, None),
    ("range that is no address", "not port 2", {"id": "b", "ranges": ["192.0.2.1", "x"]}),
    ("too many ranges", "not port 2", {"id": "c", "ranges": ["192.0.2.1"] * (MAX_PEER_RANGES + 1)}),
    ("range of another type", "not port 2", {"id": "d", "ranges": [17]}),
    ("ranges not a list", "not port 2", {"id": "e", "ranges": "192.0.2.1"}),
    ("id too long", "not port 2", {"id": "f" * 65, "ranges": []}),
    ("peer_ranges not an object", "not port 2", ["192.0.2.1"]),
]


@pytest.mark.parametrize("what, expression, ranges", BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_a_filter_that_cannot_be_applied_is_refused_whole_and_reported(ca, what, expression,
                                                                       ranges) -> None:
    server = HostileVSensor()
    server.register_answer = {**server.register_answer, "heartbeat_seconds": 0.1,
                              "filter": "not port 1",
                              "peer_ranges": {"id": "a", "ranges": ["198.51.100.0/24"]}}
    server.heartbeat_answer = {"filter": expression, "peer_ranges": ranges}
    control = RecordingControl()

    async def scenario() -> None:
        async with serving(server, ca, control):
            await wait_until(lambda: any("refused whole" in b.get("filter_note", "")
                                         for _, b in server.heartbeats), 10)
            await asyncio.sleep(0.3)  # a few more heartbeats: still refused, still reported
    asyncio.run(scenario())
    assert control.applied == [("not port 1", AddressSet.parse(["198.51.100.0/24"]))]
    notes = [b.get("filter_note", "") for _, b in server.heartbeats[1:]]
    assert notes[-1] == notes[-2] and notes[-1].startswith("cannot apply the vSensor's filter")
    assert "refused whole" in notes[-1], notes
    assert len(notes[-1]) <= 300
