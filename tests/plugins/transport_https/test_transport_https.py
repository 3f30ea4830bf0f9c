"""The https transport against real aiohttp servers over TLS (certificates from trustme).

The small servers here verify every signature with ``ossensor_core.wire.signing.verify`` and inject
faults (down at start, 503/507, 401, another CA, a self-signed certificate); the end-to-end tests
use the reference vSensor when it is installed. The one stand-in is ``FakeControl``: the real
``SensorControl`` is the running sensor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.pipeline.config import read_core_config
from ossensor_core.errors import FilterError
from ossensor_core.node.interfaces import Interface
from ossensor_core.runtime.logsetup import level
from ossensor_core.wire.signing import (H_VERSION, PATH_CHUNKS, PATH_HEARTBEAT, PATH_REGISTER,
                                    PROTOCOL_VERSIONS, AuthError, NonceCache, verify)
from ossensor_core.pipeline.contracts import CaptureStats, Chunk, Transport
from ossensor_core.pipeline.settings import PluginSettings, SettingsGroup, resolve_settings
from ossensor_core.client import connection_settings

from ossensor_plugins import transport_https
from ossensor_plugins.transport_https import HttpsTransport
from ossensor_plugins.transport_https.answers import retry_after
from ossensor_plugins.transport_https.spool import QueuedChunk
from tests.helpers.own_filter import vsensor_parts
from tests.helpers.vsensor_process import free_port

KEY = "Kx9secretHMACkey42-https"
SENSOR = "node-1"
FILTER = "not (host 192.0.2.1 and tcp port 443)"
HOST = "127.0.0.1"
LOGGER = "ossensor_plugins.transport_https"


# Chunks and the sensor stand-in ---------------------------------------------------------------

def make_chunk(sequence: int, packets: int = 3) -> Chunk:
    frames = [(1_700_000_000_000_000_000 + i * 1000, 60 + i, bytes([sequence & 0xFF, i]) * 30)
              for i in range(packets)]
    batch = PacketBatch.from_frames("eth0", 2, 1, frames)
    return Chunk(SENSOR, sequence, (batch,), time.time_ns())


class FakeControl:
    """Records the filters the transport applies; 'bad' filters fail as libpcap would."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def filters(self) -> list[str]:
        """The vSensor's part of each filter applied (``tests/helpers/own_filter.py``)."""
        return vsensor_parts(self.calls)

    def set_vsensor_filter(self, expression: str) -> None:
        if "bad" in expression:
            raise FilterError(f"syntax error in {expression!r}")
        self.calls.append(expression)

    def filter_note(self) -> str:
        return ""

    def capture_stats(self) -> dict[str, CaptureStats]:
        return {"eth0": CaptureStats(packets=100, drops=2)}

    def captured_interfaces(self) -> list[Interface]:
        return [Interface("eth0", 2, 1, 0x1, ("192.0.2.10", "fe80::1")),
                Interface("cali12", 7, 1, 0x1, ())]


# TLS and servers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(context)
    return context


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    """A server context with a self-signed certificate, and its SHA-256 fingerprint (colons)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vsensor")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "self.pem", tmp_path / "self.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return context, ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()


@contextlib.asynccontextmanager
async def serve(app: web.Application, context: ssl.SSLContext,
                port: int = 0) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, ssl_context=context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


class FakeVSensor:
    """A vSensor that checks every signature; ``chunk_answers`` scripts the chunk answers
    (status, headers) in order before it starts storing."""

    def __init__(self, keys: tuple[str, ...] = (KEY,), heartbeat_seconds: float = 10.0) -> None:
        self.keys = list(keys)
        self.nonces = NonceCache(300)
        self.filter = FILTER
        self.heartbeat_seconds = heartbeat_seconds
        self.chunk_answers: list[tuple[int, dict[str, str]]] = []
        self.stored: list[Chunk] = []
        self.attempts: list[tuple[float, int]] = []  # (time, sequence) of every chunk POST
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.auth_failures: list[str] = []
        self.nonces_seen: list[str] = []
        self.codec = ChunkCodec()
        self.slow_once = False
        self.instances: list[str] = []  # X-Ossensor-Instance of every chunk POST
        self.known = True  # False: answers 409 to chunks until the sensor registers again
        self.amnesiac = False  # True: forgets the sensor again at once (409 for ever)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PATH_REGISTER, self.register)
        app.router.add_post(PATH_HEARTBEAT, self.heartbeat)
        app.router.add_post(PATH_CHUNKS, self.chunks)
        return app

    async def _verified(self, request: web.Request) -> bytes:
        body = await request.read()
        try:
            verify(self.keys, request.method, request.path_qs, request.headers, body,
                   self.nonces)
        except AuthError as exc:
            self.auth_failures.append(str(exc))
            raise web.HTTPUnauthorized(text=f'{{"error": "{exc}"}}',
                                       content_type="application/json") from None
        assert request.headers[H_VERSION] == "1"
        self.nonces_seen.append(request.headers["X-Ossensor-Nonce"])
        return body

    async def register(self, request: web.Request) -> web.Response:
        import json
        self.registrations.append(json.loads(await self._verified(request)))
        self.known = not self.amnesiac
        return web.json_response({"version": 1, "filter": self.filter,
                                  "heartbeat_seconds": self.heartbeat_seconds,
                                  "server_time": time.time()})

    async def heartbeat(self, request: web.Request) -> web.Response:
        import json
        self.heartbeats.append(json.loads(await self._verified(request)))
        return web.json_response({"filter": self.filter})

    async def chunks(self, request: web.Request) -> web.Response:
        body = await self._verified(request)
        sequence = int(request.headers["X-Ossensor-Chunk-Sequence"])
        assert request.headers["Content-Type"] == "application/vnd.ossensor.chunk.v1"
        self.attempts.append((time.monotonic(), sequence))
        self.instances.append(request.headers.get("X-Ossensor-Instance", ""))
        if not self.known:  # as the reference vSensor after a restart
            return web.json_response({"error": "unknown_sensor"}, status=409)
        if self.chunk_answers:
            status, headers = self.chunk_answers.pop(0)
            if status == 0:  # drop the connection without an answer
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            return web.json_response({"error": f"scripted {status}"}, status=status,
                                     headers=headers)
        chunk = self.codec.decode(body)
        assert chunk.sequence == sequence
        if self.slow_once:  # store it, but answer after the client gave up
            self.slow_once = False
            self.stored.append(chunk)
            await asyncio.sleep(1.5)
        if any(c.sequence == sequence for c in self.stored):
            return web.json_response({"duplicate": True})
        self.stored.append(chunk)
        return web.json_response({"stored": chunk.packets})

    @property
    def sequences(self) -> list[int]:
        return [c.sequence for c in self.stored]


def transport(port: int, ca_file: str = "", *, key: str = KEY, **options: Any) -> HttpsTransport:
    """A transport with short back-offs and grace for tests."""
    settings: dict[str, Any] = dict(timeout_seconds=2.0, grace_seconds=0.5, backoff_min=0.05,
                                    backoff_max=0.2)  # grace below 1 s: the whole of it
    settings.update(options)
    return HttpsTransport(HOST, port, key, SENSOR, ChunkCodec(), ca_file=ca_file, **settings)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def spooled(folder: Path) -> list[str]:
    """The spooled chunks (and leftovers) in ``folder``, without the instance id file."""
    return sorted(p.name for p in folder.iterdir() if p.name != transport_https.INSTANCE_FILE)


# Settings and the hook ---------------------------------------------------------------------

def test_settings_and_hook_build_the_transport(tmp_path: Path) -> None:
    env = {"VSENSOR_HOSTNAME": "2001:db8::5", "VSENSOR_HMAC_KEY": KEY, "VSENSOR_PORT": "8443",
           "OSSENSOR_NAME": SENSOR, "OSSENSOR_SPOOL_DIR": str(tmp_path / "spool"),
           "OSSENSOR_SPOOL_MAX_BYTES": str(5 << 20), "OSSENSOR_HTTPS_MEMORY_CHUNKS": "5",
           "OSSENSOR_SHUTDOWN_GRACE": "12", "VSENSOR_TLS_VERIFY": "false"}
    config, problems = read_core_config(env)
    group = transport_https.ossensor_settings()
    assert group.plugin == "https"
    core = connection_settings()  # the vSensor TLS settings are the core's (Antigena's too)
    variables = {s.name: s.variable(g.plugin) for g in (group, core) for s in g.settings}
    assert variables == {
        "ca_file": "VSENSOR_CA_FILE", "fingerprint": "VSENSOR_TLS_FINGERPRINT",
        "tls_verify": "VSENSOR_TLS_VERIFY", "spool_dir": "OSSENSOR_SPOOL_DIR",
        "spool_max_bytes": "OSSENSOR_SPOOL_MAX_BYTES", "shutdown_grace": "OSSENSOR_SHUTDOWN_GRACE",
        "memory_chunks": "OSSENSOR_HTTPS_MEMORY_CHUNKS",
        "memory_bytes": "OSSENSOR_HTTPS_MEMORY_BYTES",
        "timeout_seconds": "OSSENSOR_HTTPS_TIMEOUT_SECONDS"}
    resolved = resolve_settings(group.settings, env, group.plugin, problems)
    core_resolved = resolve_settings(core.settings, env, core.plugin, problems)
    assert not problems
    config = dataclasses.replace(config, plugin_settings={
        "https": PluginSettings("https", resolved),
        core.plugin: PluginSettings(core.plugin, core_resolved)})
    transport_https.ossensor_configure(config=dataclasses.replace(config, transport="https"))
    made = transport_https.ossensor_transport(config=config, encoder=ChunkCodec())
    assert isinstance(made, Transport) and made.name == "https"
    assert made.base_url == "https://[2001:db8::5]:8443"
    assert made.memory_chunks == 5 and made.grace_seconds == 12.0
    assert made.spool_dir == tmp_path / "spool" and made.spool_bytes == 5 << 20
    assert made.tls_verify is False
    assert KEY not in repr(made)


def test_settings_defaults_and_former_names(tmp_path: Path) -> None:
    group = transport_https.ossensor_settings()
    group = SettingsGroup(group.plugin, [*group.settings, *connection_settings().settings])
    problems: list[str] = []
    defaults = resolve_settings(group.settings, {}, group.plugin, problems)
    assert defaults["tls_verify"].value is True
    assert defaults["spool_max_bytes"].value == 256 << 20
    assert defaults["shutdown_grace"].value == 25.0
    env = {"OSSENSOR_SPOOL_DIR": "/new", "VSENSOR_TLS_FINGERPRINT": "ab" * 32}
    resolved = resolve_settings(group.settings, env, group.plugin, problems)
    assert not problems
    assert resolved["spool_dir"].value == "/new"
    assert (resolved["fingerprint"].value, resolved["fingerprint"].source) == ("ab" * 32,
                                                                               "variable")
    resolve_settings(group.settings, {"VSENSOR_TLS_VERIFY": "maybe"}, group.plugin, problems)
    assert len(problems) == 1 and "VSENSOR_TLS_VERIFY" in problems[0]


def test_close_budget_leaves_room_in_the_shutdown_grace() -> None:
    core_wait = transport_https.SHUTDOWN_GRACE_SECONDS
    assert transport(1, grace_seconds=25).close_budget == 25 - core_wait - 2
    assert transport(1, grace_seconds=5).close_budget == 1.0  # at least 1 s
    assert transport(1, grace_seconds=0.4).close_budget == 0.4  # never more than the grace
    assert transport(1, grace_seconds=0).close_budget == 0


def test_backoff_is_exponential_with_equal_jitter() -> None:
    backoff = transport_https.Backoff(0.5, 30.0)
    waits = [backoff.next() for _ in range(12)]
    ceilings = [min(30.0, 0.5 * 2 ** n) for n in range(12)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings))
    assert waits[-1] >= 15.0
    assert backoff.next(retry_after=7.0) == 7.0
    assert backoff.next(retry_after=10_000.0) == 300.0  # RETRY_AFTER_CAP (issue 16: was 3600)
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5
    # Jitter: many sensors that start together spread out.
    spread = {round(transport_https.Backoff(1.0, 30.0).next(), 6) for _ in range(20)}
    assert len(spread) > 10


def test_bad_fingerprint_and_ca_file_are_refused_when_read(tmp_path: Path) -> None:
    """The core's connection settings are checked as they are read (one line each, for the
    transport, Antigena and diagnose alike); the transport then sees the defaults."""
    env = {"VSENSOR_HOSTNAME": "vsensor.test", "VSENSOR_HMAC_KEY": KEY,
           "VSENSOR_TLS_FINGERPRINT": "12:34", "VSENSOR_CA_FILE": str(tmp_path / "no")}
    config, problems = read_core_config(env)
    group = transport_https.ossensor_settings()
    resolved = resolve_settings(group.settings, env, group.plugin, problems)
    core = connection_settings()
    core_resolved = resolve_settings(core.settings, env, core.plugin, problems)
    config = dataclasses.replace(config, transport="https", plugin_settings={
        "https": PluginSettings("https", resolved),
        core.plugin: PluginSettings(core.plugin, core_resolved)})
    assert len(problems) == 2
    assert problems[0].startswith("VSENSOR_CA_FILE: ")
    assert problems[1].startswith("VSENSOR_TLS_FINGERPRINT: ")
    transport_https.ossensor_configure(config=config)  # nothing left to refuse


def test_retry_after_in_seconds_or_as_a_date() -> None:
    from email.utils import formatdate

    assert retry_after("7") == 7.0
    assert retry_after(None) is None
    assert retry_after("soon") == 1.0  # garbage: the floor, never a tight loop (issue 16)
    assert 25 <= retry_after(formatdate(time.time() + 30, usegmt=True)) <= 31


# Delivery --------------------------------------------------------------------------------

def test_chunks_arrive_in_order_and_every_signature_verifies(ca, ca_file, caplog) -> None:
    caplog.set_level(level(2), logger=LOGGER)
    server = FakeVSensor()
    control = FakeControl()

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file)
            await sender.start(control)
            for sequence in range(1, 31):
                await sender.send(make_chunk(sequence))
            await wait_until(lambda: len(server.stored) == 30)
            await sender.aclose()
            return sender

    sender = asyncio.run(scenario())
    assert server.sequences == list(range(1, 31))
    assert not server.auth_failures
    assert len(set(server.nonces_seen)) == len(server.nonces_seen)
    assert [c.packets for c in server.stored] == [3] * 30
    assert server.stored[4].batches[0].data == make_chunk(5).batches[0].data
    (registration,) = server.registrations
    assert registration == {"sensor": SENSOR, "versions": list(PROTOCOL_VERSIONS),
                            "software": registration["software"],
                            "instance": sender.instance, "addresses": ["192.0.2.10"],
                            "interfaces": ["eth0", "cali12"], "primary_address": HOST,
                            "workloads": registration["workloads"],
                            "features": ["peer-ranges", "filter-refresh"]}
    assert registration["software"].startswith("ossensor ")
    assert len(sender.instance) == 32 and int(sender.instance, 16) >= 0
    assert set(server.instances) == {sender.instance} and len(server.instances) == 30
    assert control.filters == [FILTER]
    assert (sender.chunks_sent, sender.packets_sent) == (30, 90)
    assert sender.bytes_sent > 0 and sender.chunks_dropped == 0 == sender.chunks_spooled
    assert "chunk 7: 3 packets" in caplog.text and "-> 200" in caplog.text
    assert "again" not in caplog.text  # nothing failed, so nothing "works again"


def test_vsensor_down_at_start_then_up_nothing_lost(ca, ca_file, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeVSensor(heartbeat_seconds=0.1)
    control = FakeControl()
    port = free_port()

    async def scenario() -> None:
        sender = transport(port, ca_file)
        began = time.monotonic()
        await sender.start(control)
        for sequence in range(1, 6):
            await sender.send(make_chunk(sequence))
        assert time.monotonic() - began < 1.0, "start and send must not wait for the vSensor"
        await asyncio.sleep(0.5)  # several failed registrations
        assert sender.queued_chunks == 5 and not sender.registered
        async with serve(server.app(), server_context(ca), port):
            await wait_until(lambda: len(server.stored) == 5)
            await sender.send(make_chunk(6))
            await wait_until(lambda: len(server.stored) == 6)
            # A changed filter comes with a heartbeat and is applied in place.
            server.filter = "not host 198.51.100.7"
            await wait_until(lambda: control.filters[-1] == "not host 198.51.100.7")
            # One that does not compile is refused; the old one stays.
            server.filter = "bad filter"
            await wait_until(lambda: "cannot apply the vSensor's filter" in caplog.text)
            await asyncio.sleep(0.3)
            await sender.aclose()
        assert sender.vsensor_filter == "not host 198.51.100.7"

    asyncio.run(scenario())
    assert server.sequences == [1, 2, 3, 4, 5, 6]
    assert len(server.registrations) == 1
    assert control.filters == [FILTER, "not host 198.51.100.7"]
    assert server.heartbeats and server.heartbeats[0] == {
        "interfaces": {"eth0": {"packets": 100, "drops": 2}},
        "dropped": {"chunks": 0, "packets": 0}}
    # Registration failures are logged once, not once per attempt; the error is logged once.
    failures = [r for r in caplog.records if "cannot register" in r.getMessage()]
    assert len(failures) == 1
    assert len([r for r in caplog.records if "cannot apply" in r.getMessage()]) == 1


def send_two_chunks(server: FakeVSensor, ca, ca_file, done: Callable[[HttpsTransport], bool],
                    **options: Any) -> HttpsTransport:
    """Send chunks 1 and 2 through a transport to ``server``, wait for ``done``, close."""

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file, **options)
            await sender.start(FakeControl())
            await sender.send(make_chunk(1))
            await sender.send(make_chunk(2))
            await wait_until(lambda: done(sender))
            await sender.aclose()
            return sender

    return asyncio.run(scenario())


def test_503_with_retry_after_then_success(ca, ca_file, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeVSensor()
    server.chunk_answers = [(503, {"Retry-After": "1"}), (507, {}), (507, {}), (500, {})]

    sender = send_two_chunks(server, ca, ca_file, lambda sender: len(server.stored) == 2)
    assert server.sequences == [1, 2]
    assert [s for _, s in server.attempts] == [1, 1, 1, 1, 1, 2]
    assert server.attempts[1][0] - server.attempts[0][0] >= 0.9, "Retry-After was not honoured"
    # Registration, six chunk attempts, the goodbye heartbeat at aclose.
    assert len(set(server.nonces_seen)) == len(server.nonces_seen) == 1 + 6 + 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    # One message per change of state (503, 507, 500), none for the repeated 507.
    assert len(errors) == 3, errors
    assert "HTTP 503" in errors[0] and "HTTP 507" in errors[1] and "HTTP 500" in errors[2]
    assert "takes chunks again" in caplog.text
    assert sender.chunks_sent == 2 and sender.chunks_dropped == 0
    assert sender.chunk_retries == 4  # the metric ossensor_transport_chunk_retries_total


def test_dropped_connection_and_slow_answer_are_retried(ca, ca_file, caplog) -> None:
    server = FakeVSensor()
    server.chunk_answers = [(0, {})]
    server.slow_once = True

    sender = send_two_chunks(server, ca, ca_file, lambda sender: sender.chunks_sent == 2, timeout_seconds=0.5)
    # 1: dropped, then stored but answered too late, then answered "duplicate"; 2: stored.
    assert [s for _, s in server.attempts] == [1, 1, 1, 2]
    assert server.sequences == [1, 2]
    assert sender.chunks_duplicate == 1 and sender.chunks_dropped == 0
    assert "no answer within 0.5 s" in caplog.text


def test_400_is_logged_counted_and_dropped(ca, ca_file, caplog) -> None:
    server = FakeVSensor()
    server.chunk_answers = [(400, {})]

    sender = send_two_chunks(server, ca, ca_file, lambda sender: len(server.stored) == 1)
    assert server.sequences == [2]
    assert sender.chunks_dropped == 1 and sender.packets_dropped == 3
    assert "refused chunk 1 as malformed (scripted 400)" in caplog.text


def test_401_wrong_key_keeps_chunks_and_never_logs_the_key(ca, ca_file, tmp_path,
                                                           caplog) -> None:
    caplog.set_level(1)  # everything, from every logger (aiohttp's too)
    server = FakeVSensor(keys=("the-vsensor-has-another-key",))
    spool = tmp_path / "spool"

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file, spool_dir=str(spool))
            await sender.start(FakeControl())
            for sequence in range(1, 4):
                await sender.send(make_chunk(sequence))
            await wait_until(lambda: len(server.auth_failures) >= 4)
            assert sender.queued_chunks == 3 and sender.chunks_sent == 0
            # The key is rotated on the vSensor: the kept chunks go through.
            server.keys.append(KEY)
            await wait_until(lambda: len(server.stored) == 3)
            await sender.aclose()
            return sender

    sender = asyncio.run(scenario())
    assert server.sequences == [1, 2, 3]
    assert all("signature does not match" in failure for failure in server.auth_failures)
    rejected = [r for r in caplog.records
                if "vSensor rejected the key or the clock" in r.getMessage()]
    assert len(rejected) == 1 and "signature does not match" in rejected[0].getMessage()
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in str(record.exc_text)
    assert sender.chunks_dropped == 0 and spooled(spool) == []


def test_memory_only_applies_back_pressure_and_loses_nothing(ca, ca_file) -> None:
    server = FakeVSensor()
    port = free_port()

    async def scenario() -> None:
        sender = transport(port, ca_file, memory_chunks=2)
        await sender.start(FakeControl())
        await sender.send(make_chunk(1))
        await sender.send(make_chunk(2))
        blocked = asyncio.create_task(sender.send(make_chunk(3)))
        await asyncio.sleep(0.3)
        assert not blocked.done(), "send must wait for room, not drop"
        async with serve(server.app(), server_context(ca), port):
            await asyncio.wait_for(blocked, 10)
            await sender.send(make_chunk(4))
            await wait_until(lambda: len(server.stored) == 4)
            await sender.aclose()

    asyncio.run(scenario())
    assert server.sequences == [1, 2, 3, 4]


def test_409_registers_again_and_resends_the_chunk(ca, ca_file, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeVSensor()

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file)
            await sender.start(FakeControl())
            await sender.send(make_chunk(1))
            await wait_until(lambda: server.sequences == [1])
            server.known = False  # the vSensor restarted and forgot this sensor
            await sender.send(make_chunk(2))
            await sender.send(make_chunk(3))
            await wait_until(lambda: len(server.stored) == 3)
            await sender.aclose()
            return sender

    sender = asyncio.run(scenario())
    assert server.sequences == [1, 2, 3]
    assert [s for _, s in server.attempts] == [1, 2, 2, 3]  # 2: 409, then sent again
    assert len(server.registrations) == 2 and sender.reregistrations == 1
    assert server.registrations[0]["instance"] == server.registrations[1]["instance"]
    assert sender.chunks_dropped == 0 and sender.chunks_sent == 3
    forgot = [r for r in caplog.records if "does not know this sensor" in r.getMessage()]
    assert len(forgot) == 1 and forgot[0].levelno == logging.WARNING
    assert "registering again" in forgot[0].getMessage()
    assert "takes chunks again" in caplog.text


def test_409_after_every_registration_backs_off(ca, ca_file) -> None:
    server = FakeVSensor()
    server.known = server.amnesiac = True  # registers, then forgets the sensor at once

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file, backoff_min=0.1, backoff_max=0.4)
            await sender.start(FakeControl())
            await sender.send(make_chunk(1))
            await asyncio.sleep(1.5)
            await sender.aclose()
            return sender

    sender = asyncio.run(scenario())
    # Back-off between rounds (0.05-0.1, 0.1-0.2, 0.2-0.4, 0.2-0.4, ...): a handful, not hundreds.
    assert 3 <= len(server.attempts) <= 10, len(server.attempts)
    assert len(server.registrations) - len(server.attempts) in (0, 1)  # cancelled in a wait
    assert server.stored == [] and sender.queued_chunks == 0 and sender.chunks_dropped == 1


def test_instance_id_is_kept_in_the_spool_folder(ca, ca_file, tmp_path) -> None:
    server = FakeVSensor()
    spool = tmp_path / "spool"

    async def run(spool_dir: str) -> str:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file, spool_dir=spool_dir)
            await sender.start(FakeControl())
            await sender.send(make_chunk(len(server.stored) + 1))
            await wait_until(lambda: len(server.registrations) == len(server.instances))
            await sender.aclose()
            return sender.instance

    first = asyncio.run(run(str(spool)))
    assert (spool / "instance-id").read_text().strip() == first
    assert (spool / "instance-id").stat().st_mode & 0o777 == 0o600
    assert asyncio.run(run(str(spool))) == first  # a restart keeps it
    without = [asyncio.run(run("")), asyncio.run(run(""))]  # one per process
    assert len({first, *without}) == 3
    assert [r["instance"] for r in server.registrations] == [first, first, *without]
    assert server.instances == [first, first, *without]
    # A damaged file is replaced.
    (spool / "instance-id").write_text("garbage\n")
    replaced = asyncio.run(run(str(spool)))
    assert replaced != first and (spool / "instance-id").read_text().strip() == replaced


def test_aclose_gives_up_within_the_budget_and_returns_at_once_when_done(ca, ca_file,
                                                                         tmp_path) -> None:
    server = FakeVSensor()
    spool = tmp_path / "spool"

    async def scenario() -> tuple[float, float]:
        # The vSensor is away: aclose tries for the budget, then spools.
        away = transport(free_port(), ca_file, spool_dir=str(spool), grace_seconds=0.8)
        await away.start(FakeControl())
        await away.send(make_chunk(1))
        began = time.monotonic()
        await away.aclose()
        gave_up = time.monotonic() - began
        assert away.chunks_spooled == 1 and len(spooled(spool)) == 1
        # Everything delivered: aclose does not wait for the (long) grace.
        async with serve(server.app(), server_context(ca)) as port:
            done = transport(port, ca_file, grace_seconds=25.0)
            await done.start(FakeControl())
            await done.send(make_chunk(2))
            await wait_until(lambda: done.chunks_sent == 1)
            began = time.monotonic()
            await done.aclose()
            return gave_up, time.monotonic() - began

    gave_up, prompt = asyncio.run(scenario())
    assert 0.75 <= gave_up < 1.5
    assert prompt < 0.5


def test_aclose_waits_for_the_chunk_in_flight(ca, ca_file) -> None:
    server = FakeVSensor()
    server.slow_once = True  # answers after 1.5 s, within the timeout

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file, grace_seconds=8.0, timeout_seconds=3.0)  # budget 2 s
            await sender.start(FakeControl())
            await sender.send(make_chunk(1))
            await wait_until(lambda: len(server.attempts) == 1)
            await sender.aclose()
            return sender

    sender = asyncio.run(scenario())
    assert sender.chunks_sent == 1 and server.sequences == [1]
    assert [s for _, s in server.attempts] == [1], "the chunk in flight was not cut off"


# The spool -------------------------------------------------------------------------------

def test_spool_survives_a_restart_and_is_sent_first(ca, ca_file, tmp_path) -> None:
    server = FakeVSensor()
    spool = tmp_path / "spool"
    port = free_port()

    async def first_run() -> HttpsTransport:
        sender = transport(port, ca_file, spool_dir=str(spool), memory_chunks=2,
                           grace_seconds=0.3)
        await sender.start(FakeControl())
        for sequence in range(1, 7):
            await sender.send(make_chunk(sequence))
        assert len(spooled(spool)) == 4, "the oldest chunks beyond memory_chunks spill"
        # The depths the metrics show (ossensor_transport_spool_chunks and _bytes, _memory_bytes).
        assert sender.spooled_chunks == 4 and sender.queued_chunks == 6
        assert sender.spooled_bytes == sum(p.stat().st_size for p in spool.glob("*.chunk"))
        assert sender.memory_queued_bytes == sum(len(e.payload) for e in sender._memory) > 0
        await sender.aclose()
        return sender

    first = asyncio.run(first_run())
    assert first.chunks_spooled == 6 and first.chunks_sent == 0 and first.chunks_dropped == 0
    names = spooled(spool)
    assert len(names) == 6 and all(n.endswith(".chunk") for n in names)

    async def second_run() -> HttpsTransport:
        async with serve(server.app(), server_context(ca), port):
            sender = transport(port, ca_file, spool_dir=str(spool), memory_chunks=2)
            await sender.start(FakeControl())
            await sender.send(make_chunk(107))
            await sender.send(make_chunk(108))
            await wait_until(lambda: len(server.stored) == 8)
            await sender.aclose()
            return sender

    second = asyncio.run(second_run())
    assert server.sequences == [1, 2, 3, 4, 5, 6, 107, 108]
    assert spooled(spool) == []
    assert second.chunks_sent == 8 and second.packets_sent == 24


def test_spool_limit_drops_the_oldest_and_counts_them(ca, ca_file, tmp_path, caplog) -> None:
    server = FakeVSensor()
    spool = tmp_path / "spool"
    port = free_port()
    size = len(ChunkCodec().encode(make_chunk(1)))

    async def scenario() -> HttpsTransport:
        sender = transport(port, ca_file, spool_dir=str(spool), memory_chunks=1,
                           spool_bytes=3 * size + size // 2)
        await sender.start(FakeControl())
        for sequence in range(1, 7):
            await sender.send(make_chunk(sequence))
        # 5 spilled, room for 3: chunks 1 and 2 are gone, counted and logged.
        assert sender.chunks_dropped == 2 and sender.packets_dropped == 6
        assert len(spooled(spool)) == 3
        async with serve(server.app(), server_context(ca), port):
            await wait_until(lambda: len(server.stored) == 4)
            await sender.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert server.sequences == [3, 4, 5, 6]
    errors = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert len(errors) == 2 and "dropped the oldest chunk 1 " in errors[0]
    assert sender.chunks_dropped == 2
    assert (sender.spool_full_chunks, sender.spool_full_packets) == (2, 6)


def test_spool_full_drops_are_reported_in_every_heartbeat(ca, ca_file, tmp_path,
                                                          caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeVSensor(heartbeat_seconds=0.1)
    server.chunk_answers = [(400, {})]  # a refused chunk is dropped, but not for a full spool
    spool = tmp_path / "spool"
    port = free_port()
    size = len(ChunkCodec().encode(make_chunk(1)))

    async def scenario() -> None:
        sender = transport(port, ca_file, spool_dir=str(spool), memory_chunks=1,
                           spool_bytes=2 * size + size // 2)
        await sender.start(FakeControl())
        for sequence in range(1, 6):  # 4 spilled, room for 2: chunks 1 and 2 dropped
            await sender.send(make_chunk(sequence))
        async with serve(server.app(), server_context(ca), port):
            await wait_until(lambda: len(server.heartbeats) >= 3)
            await sender.aclose()
        assert sender.chunks_dropped == 3 and sender.spool_full_chunks == 2

    asyncio.run(scenario())
    assert server.sequences == [4, 5]  # 3 was refused with 400
    assert all(h["dropped"] == {"chunks": 2, "packets": 6} for h in server.heartbeats)
    reported = [r for r in caplog.records if "reporting it to the vSensor" in r.getMessage()]
    assert len(reported) == 1 and reported[0].levelno == logging.WARNING
    assert "2 chunks (6 packets)" in reported[0].getMessage()


def test_without_spool_aclose_reports_what_is_lost(ca_file, caplog) -> None:
    async def scenario() -> HttpsTransport:
        sender = transport(free_port(), ca_file, grace_seconds=0.2)
        await sender.start(FakeControl())
        await sender.send(make_chunk(1, packets=4))
        await sender.send(make_chunk(2, packets=5))
        await sender.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert sender.chunks_dropped == 2 and sender.packets_dropped == 9
    assert "2 chunks (9 packets) not delivered" in caplog.text


# TLS -------------------------------------------------------------------------------------

def test_certificate_from_another_ca_is_refused(ca_file, tmp_path, caplog) -> None:
    server = FakeVSensor()
    other = trustme.CA()

    async def scenario() -> HttpsTransport:
        async with serve(server.app(), server_context(other)) as port:
            sender = transport(port, ca_file)
            await sender.start(FakeControl())
            await sender.send(make_chunk(1))
            await asyncio.sleep(0.6)
            assert sender.queued_chunks == 1
            await sender.aclose()
            return sender

    asyncio.run(scenario())
    assert server.registrations == [] and server.stored == []
    assert "not trusted" in caplog.text


def test_fingerprint_pinning_accepts_a_self_signed_certificate(tmp_path, caplog) -> None:
    server = FakeVSensor()
    context, fingerprint = self_signed(tmp_path)

    async def scenario() -> None:
        async with serve(server.app(), context) as port:
            pinned = transport(port, fingerprint=fingerprint)
            await pinned.start(FakeControl())
            await pinned.send(make_chunk(1))
            await wait_until(lambda: server.sequences == [1])
            await pinned.aclose()
            # Without the pin the same certificate is not trusted; with a wrong pin neither.
            for options in ({}, {"fingerprint": "ab" * 32}):
                refused = transport(port, **options)
                await refused.start(FakeControl())
                await refused.send(make_chunk(2))
                await asyncio.sleep(0.4)
                assert refused.queued_chunks == 1
                await refused.aclose()

    asyncio.run(scenario())
    assert server.sequences == [1]
    assert "does not match the pinned fingerprint" in caplog.text


def test_tls_verify_off_accepts_any_certificate_with_one_warning(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeVSensor()
    context, _fingerprint = self_signed(tmp_path)

    async def scenario() -> None:
        async with serve(server.app(), context) as port:
            unverified = transport(port, tls_verify=False)
            await unverified.start(FakeControl())
            for sequence in (1, 2):
                await unverified.send(make_chunk(sequence))
            await wait_until(lambda: server.sequences == [1, 2])
            await unverified.aclose()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "VSENSOR_TLS_VERIFY" in warnings[0] and "not authenticated" in warnings[0]


# End to end with the reference vSensor -------------------------------------------------------

def _vsensor_app() -> Any:
    try:
        from ossensor_vsensor.app import VSensorSettings, create_app
    except ImportError as exc:
        pytest.skip(f"the reference vSensor does not import ({exc}); pip install -e vsensor")
    return VSensorSettings, create_app


def test_end_to_end_with_the_reference_vsensor(ca, ca_file, tmp_path) -> None:
    VSensorSettings, create_app = _vsensor_app()
    data = tmp_path / "data"
    spool = tmp_path / "spool"
    port = free_port()
    control = FakeControl()

    async def scenario() -> HttpsTransport:
        sender = transport(port, ca_file, spool_dir=str(spool), memory_chunks=2)
        await sender.start(control)
        for sequence in range(1, 6):  # the vSensor is not up yet
            await sender.send(make_chunk(sequence))
        app = create_app(VSensorSettings(data_dir=data, keys=["old-key", KEY],
                                         vsensor_ports=[port]))
        async with serve(app, server_context(ca), port):
            await wait_until(lambda: sender.chunks_sent == 5)
            await sender.send(make_chunk(6))
            await wait_until(lambda: sender.chunks_sent == 6)
            await sender.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert sender.packets_sent == 18 and sender.chunks_dropped == 0
    assert control.filters, "the vSensor's filter was applied"
    files = [p for p in (data / SENSOR).rglob("*") if p.is_file() and p.name[0] != "."]
    assert files and not any(p.name.endswith(".part") for p in files)
    if sys.platform and __import__("shutil").which("tshark"):
        import subprocess
        count = sum(len(subprocess.run(["tshark", "-r", str(p)], capture_output=True,
                                       text=True).stdout.splitlines()) for p in files)
        assert count == 18


def test_end_to_end_wrong_key_is_refused_by_the_reference_vsensor(ca, ca_file, tmp_path,
                                                                  caplog) -> None:
    VSensorSettings, create_app = _vsensor_app()
    caplog.set_level(1)

    async def scenario() -> HttpsTransport:
        app = create_app(VSensorSettings(data_dir=tmp_path / "data", keys=["another-key"]))
        async with serve(app, server_context(ca)) as port:
            sender = transport(port, ca_file, key=KEY)
            await sender.start(FakeControl())
            await sender.send(make_chunk(1))
            await wait_until(lambda: "vSensor rejected the key or the clock" in caplog.text)
            assert sender.queued_chunks == 1
            await sender.aclose()
            return sender

    asyncio.run(scenario())
    assert KEY not in caplog.text


def test_end_to_end_chunks_after_a_sensor_restart_are_stored(ca, ca_file, tmp_path) -> None:
    VSensorSettings, create_app = _vsensor_app()

    async def scenario() -> int:
        app = create_app(VSensorSettings(data_dir=tmp_path / "data", keys=[KEY]))
        async with serve(app, server_context(ca)) as port:
            for _run in range(2):  # two sensor processes, each numbering from the clock
                sender = transport(port, ca_file)
                await sender.start(FakeControl())
                first = time.time_ns()  # as ossensor_core.pipeline.sensor.Sensor starts its sequence
                for sequence in (first, first + 1):
                    await sender.send(make_chunk(sequence))
                await wait_until(lambda: sender.chunks_sent == 2)
                await sender.aclose()
            duplicates = sender.chunks_duplicate
        return duplicates

    assert asyncio.run(scenario()) == 0  # the second run took the name over at once (goodbye)


def test_end_to_end_reference_vsensor_restart_means_register_again(ca, ca_file,
                                                                   tmp_path) -> None:
    """A restarted vSensor answers 409 to a sensor it does not know; the sensor registers again
    and nothing is lost. The new fields (instance, primary_address, dropped) are accepted."""
    VSensorSettings, create_app = _vsensor_app()
    data = tmp_path / "data"
    port = free_port()

    def app() -> Any:
        return create_app(VSensorSettings(data_dir=data, keys=[KEY], heartbeat_seconds=0.1,
                                          vsensor_ports=[port]))

    async def scenario() -> HttpsTransport:
        sender = transport(port, ca_file, spool_dir=str(tmp_path / "spool"))
        await sender.start(FakeControl())
        async with serve(app(), server_context(ca), port):
            await sender.send(make_chunk(1))
            await wait_until(lambda: sender.chunks_sent == 1)
            await asyncio.sleep(0.3)  # heartbeats with "dropped" are accepted
            assert sender._report.states.get("heartbeat") in (None, "ok")
        async with serve(app(), server_context(ca), port):  # a new process: it knows no one
            await sender.send(make_chunk(2))
            await wait_until(lambda: sender.chunks_sent == 2)
            await sender.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert sender.chunks_dropped == 0 and sender.packets_sent == 6


class TcpProxy:
    """A TCP relay standing in for a load balancer: counts connections and bytes relayed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.bytes_up = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._relay, HOST, 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       upward: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if upward:
                        self.bytes_up += len(data)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def test_registration_through_a_load_balancer_then_direct(ca, ca_file, tmp_path, caplog) -> None:
    """The vSensor answers the registration (through the proxy) with its own address: chunks
    and heartbeats then go there directly; when that address fails, back through the proxy."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    VSensorSettings, create_app = _vsensor_app()
    vsensor_port = free_port()

    def random_chunk(sequence: int) -> Chunk:  # incompressible: about 50 KB on the wire
        frames = [(time.time_ns(), 1000, os.urandom(1000)) for _ in range(50)]
        return Chunk(SENSOR, sequence, (PacketBatch.from_frames("eth0", 2, 1, frames),),
                     time.time_ns())

    async def scenario() -> tuple[HttpsTransport, TcpProxy, int]:
        app = create_app(VSensorSettings(data_dir=tmp_path / "data", keys=[KEY],
                                         heartbeat_seconds=0.2,
                                         direct=(HOST, vsensor_port)))
        proxy = TcpProxy(vsensor_port)
        async with serve(app, server_context(ca), vsensor_port), proxy as proxy_port:
            sender = transport(proxy_port, ca_file)
            await sender.start(FakeControl())
            for sequence in range(1, 11):
                await sender.send(random_chunk(sequence))
            await wait_until(lambda: sender.chunks_sent == 10)
            direct_phase = proxy.bytes_up
            await asyncio.sleep(0.5)  # heartbeats go direct too
            assert proxy.bytes_up == direct_phase
            await sender.aclose()
            # A direct address that does not answer: the sensor goes back to the proxy.
            app2 = create_app(VSensorSettings(data_dir=tmp_path / "data2", keys=[KEY],
                                              direct=(HOST, free_port())))
            second_port = free_port()
            async with serve(app2, server_context(ca), second_port), \
                    TcpProxy(second_port) as proxy2_port:
                fallback = transport(proxy2_port, ca_file)
                await fallback.start(FakeControl())
                await fallback.send(make_chunk(1))
                await wait_until(lambda: fallback.chunks_sent == 1, timeout=20)
                await fallback.aclose()
        return sender, proxy, direct_phase

    sender, proxy, direct_phase = asyncio.run(scenario())
    assert sender.chunks_sent == 10
    # Through the proxy: the registration only, far less than one of the ten chunks.
    assert 0 < direct_phase < 50_000, direct_phase
    assert "talking to https://127.0.0.1:%d" % vsensor_port in caplog.text
    assert "direct address" in caplog.text and "failed" in caplog.text


# Chunk format versions (rolling upgrade) --------------------------------------------------------

def record_chunk_versions(app: web.Application) -> list[int]:
    """The ``ossensor-chunk`` version byte of every chunk POST that reaches ``app``."""
    versions: list[int] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == PATH_CHUNKS:
            versions.append((await request.read())[4])  # read() keeps the body for the handler
        return await handler(request)

    app.middlewares.append(record)
    return versions


def table_chunk(sequence: int) -> Chunk:
    from ossensor_core.pipeline.contracts import InterfaceCounters
    return dataclasses.replace(make_chunk(sequence), interfaces=(
        InterfaceCounters("eth0", 2, 1, 100 * sequence, sequence),))


def test_chunk_format_v1_to_a_vsensor_that_does_not_list_v2(ca, ca_file) -> None:
    server = FakeVSensor()  # answers registrations without "chunk_versions", as before v2
    app = server.app()
    versions = record_chunk_versions(app)

    async def scenario() -> HttpsTransport:
        async with serve(app, server_context(ca)) as port:
            sender = transport(port, ca_file)
            await sender.start(FakeControl())
            await wait_until(lambda: sender.registered)
            for sequence in (1, 2):
                await sender.send(table_chunk(sequence))
            await wait_until(lambda: sender.chunks_sent == 2)
            await sender.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert sender.chunk_version == 1 and versions == [1, 1]
    assert [(c.instance, c.interfaces) for c in server.stored] == [("", ())] * 2


def test_chunk_format_v2_to_the_reference_vsensor_after_registration(ca, ca_file,
                                                                     tmp_path) -> None:
    """Before registration chunks are encoded as v1 (every vSensor reads it), after it as v2
    with the transport's instance and the interface table, whose counters the vSensor shows
    without a heartbeat."""
    VSensorSettings, create_app = _vsensor_app()
    port = free_port()
    app = create_app(VSensorSettings(data_dir=tmp_path / "data", keys=[KEY],
                                     heartbeat_seconds=3600.0, vsensor_ports=[port]))
    versions = record_chunk_versions(app)

    async def scenario() -> tuple[HttpsTransport, dict[str, dict[str, int]]]:
        sender = transport(port, ca_file, spool_dir=str(tmp_path / "spool"))
        await sender.start(FakeControl())
        await sender.send(table_chunk(1))  # the vSensor is not up: encoded as v1
        async with serve(app, server_context(ca), port):
            await wait_until(lambda: sender.chunks_sent == 1)
            await sender.send(table_chunk(2))
            await wait_until(lambda: sender.chunks_sent == 2)
            from ossensor_vsensor.app import VSENSOR
            kernel = dict(app[VSENSOR].sensors[SENSOR].kernel)
            await sender.aclose()
        return sender, kernel

    sender, kernel = asyncio.run(scenario())
    assert sender.chunk_version == 2 and versions == [1, 2]
    assert sender.chunks_dropped == 0 and sender.packets_sent == 6
    assert kernel == {"eth0": {"packets": 200, "drops": 2}}  # from chunk 2, no heartbeat yet


def test_chunks_encoded_for_a_newer_vsensor_are_sent_in_the_older_format(ca, ca_file) -> None:
    """A vSensor rolled back while v2 chunks waited: they go out as v1, nothing is dropped."""
    server = FakeVSensor()
    app = server.app()
    versions = record_chunk_versions(app)

    async def scenario() -> HttpsTransport:
        async with serve(app, server_context(ca)) as port:
            sender = transport(port, ca_file)
            sender.chunk_version = 2  # as registered with a newer vSensor earlier
            payload, _ = sender._encode(make_chunk(1))
            assert payload[4] == 2
            await sender.start(FakeControl())  # this vSensor does not list chunk_versions
            await wait_until(lambda: sender.registered)
            assert sender.chunk_version == 1
            sender._order += 1
            sender._memory.append(QueuedChunk(sender._order, 1, 3, len(payload), payload))
            sender._wakeup.set()
            await wait_until(lambda: sender.chunks_sent == 1)
            await sender.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert server.sequences == [1] and sender.chunks_dropped == 0 and versions == [1]
    assert server.stored[0].batches[0].data == make_chunk(1).batches[0].data


def test_refresh_sends_the_next_heartbeat_at_once(ca, ca_file) -> None:
    """What the Antigena plugin calls when the vSensor says filters changed."""
    server = FakeVSensor(heartbeat_seconds=60.0)
    control = FakeControl()

    async def scenario() -> float:
        async with serve(server.app(), server_context(ca)) as port:
            sender = transport(port, ca_file)
            await sender.start(control)
            await wait_until(lambda: sender.registered)
            await asyncio.sleep(0.3)
            assert server.heartbeats == []  # the next one is a minute away
            server.filter = "not host 198.51.100.9"
            started = time.monotonic()
            sender.refresh()
            await wait_until(lambda: control.filters[-1:] == ["not host 198.51.100.9"])
            took = time.monotonic() - started
            await sender.aclose()
            return took

    assert asyncio.run(scenario()) < 1.0
    assert server.heartbeats


def test_the_own_exclusion_covers_every_address_of_the_configured_vsensor() -> None:
    from ossensor_plugins.transport_https.filters import own_exclusion

    assert asyncio.run(own_exclusion("192.0.2.254", 8443)) == \
        "not (host 192.0.2.254 and tcp port 8443)"
    assert asyncio.run(own_exclusion("2001:db8::fe", 443)) == \
        "not (host 2001:db8::fe and tcp port 443)"
    # A name: every address it resolves to (here from /etc/hosts, no DNS needed).
    assert "not (host 127.0.0.1 and tcp port 443)" in asyncio.run(own_exclusion("localhost", 443))
    # A name that does not resolve: nothing (the vSensor's own filter comes with registration).
    assert asyncio.run(own_exclusion("no-such-host.invalid", 443, timeout=5)) == ""
