"""The https transport: chunks shipped to a vSensor over HTTPS (``docs/protocol.md``).

``start`` opens a session and returns at once; a background task registers (with back-off until
the vSensor answers), applies the filter it hands out, sends heartbeats and POSTs the queued
chunks in order, each attempt signed afresh (new nonce and timestamp). The sensor keeps
capturing while the vSensor is away:

* ``send`` encodes a chunk once (on a worker thread: zstd and the body digest release the GIL)
  and queues it in memory (``memory_chunks``, ``memory_bytes``). When memory is full
  the oldest chunk moves to the spool folder (``spool_dir``, one file per chunk written under a
  temporary name and renamed). Without a spool folder ``send`` waits for room (back-pressure):
  an accepted chunk is never dropped to make room.
* The spool is bounded by ``spool_bytes``; when full, the OLDEST spooled chunks are deleted,
  counted in ``chunks_dropped`` and logged as errors: a bounded loss that is reported.
* Chunks dropped because the spool was full are reported in every heartbeat
  (``"dropped": {"chunks": n, "packets": n}``) and logged when the count grows.
* ``aclose`` keeps trying until the shutdown budget (``close_budget``: the shutdown grace minus
  the core's own wait and a margin) runs out, then spools what is left; the next run sends
  spooled chunks first, oldest first. It returns at once when nothing is pending.

Chunks go out on their own blocking keep-alive connection, driven from one worker thread
(``bulk.py`` says why: asyncio's TLS costs about twice the CPU per byte); registration and
heartbeats use the aiohttp session.

Registration sends an instance id (``instance``: a uuid4 kept in the spool folder as
``instance-id``, or one per process without a spool folder) and the primary address (the source
address this host uses towards the vSensor); every chunk request carries the id in
``X-Ossensor-Instance``. A vSensor that ignores unknown fields and headers is unaffected.
Chunks are encoded as ``ossensor-chunk`` v1 until a registration answer lists a higher version
the encoder writes in ``chunk_versions`` (a rolling upgrade); v2 chunks carry the instance id and
the interface table with the kernel counters.

Answers: 200 (also ``{"duplicate": true}``) drops our copy; 400 is logged, counted and dropped
(retrying cannot help); 409 (the vSensor does not know us, e.g. after it restarted) registers
again and sends the chunk again; 401, 5xx, 507, connection errors and time-outs keep the chunk
and back off (exponential with equal jitter, ``backoff_min`` doubling to ``backoff_max``, or what
``Retry-After`` says). Failures are logged once per change of state, not per attempt. The HMAC
key is used for signing only and never logged.

Settings: ``VSENSOR_CA_FILE``, ``VSENSOR_TLS_FINGERPRINT``, ``VSENSOR_TLS_VERIFY``,
``OSSENSOR_SPOOL_DIR``, ``OSSENSOR_SPOOL_MAX_BYTES``, ``OSSENSOR_SHUTDOWN_GRACE``,
``OSSENSOR_HTTPS_MEMORY_CHUNKS``, ``OSSENSOR_HTTPS_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import socket
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ossensor_core import __version__
from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.errors import ConfigError, FilterError, InterfaceError, TransportError
from ossensor_core.ops.logsetup import level
from ossensor_core.plugin import hookimpl
from ossensor_core.wire.signing import (DIGESTS, H_INSTANCE, H_VERSION, PATH_CHUNKS, PATH_HEARTBEAT,
                                    PATH_REGISTER, PROTOCOL_VERSIONS, SHA256, content_digest,
                                    sign)
from ossensor_core.pipeline.contracts import Chunk, ChunkEncoder, SensorControl, Transport
from ossensor_core.pipeline.sensor import SHUTDOWN_GRACE_SECONDS

from .bulk import BulkAnswer, BulkConnection, BulkError, client_context
from ossensor_core.pipeline.settings import Setting, SettingsGroup
from ossensor_core.ops.threads import named_executor
from ossensor_core.node.workloads import WorkloadFinder

log = logging.getLogger(__name__)

H_SEQUENCE = "X-Ossensor-Chunk-Sequence"
INSTANCE_FILE = "instance-id"
ENV_CA_FILE = "VSENSOR_CA_FILE"
ENV_FINGERPRINT = "VSENSOR_TLS_FINGERPRINT"
ENV_TLS_VERIFY = "VSENSOR_TLS_VERIFY"
ENV_SPOOL_DIR = "OSSENSOR_SPOOL_DIR"
ENV_SPOOL_MAX_BYTES = "OSSENSOR_SPOOL_MAX_BYTES"
ENV_SHUTDOWN_GRACE = "OSSENSOR_SHUTDOWN_GRACE"
#: Kept free at the end of the shutdown grace for spooling, closing and the process exit.
SHUTDOWN_MARGIN_SECONDS = 2.0
SPOOL_SUFFIX = ".chunk"
DIRECT_RETRY_SECONDS = 300.0  # a failed direct address is not used again for this long
TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o600  # captured payloads are sensitive
_SPOOL_NAME = re.compile(r"^(\d{20})-(\d{1,20})-(\d+)\.chunk$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_INSTANCE = re.compile(r"^[0-9a-f]{32}$")


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("https", [
        Setting("ca_file", str, "",
                "CA bundle (PEM) that verifies the vSensor's certificate; empty: the system CAs.",
                env=ENV_CA_FILE),
        Setting("fingerprint", str, "",
                "SHA-256 fingerprint of the vSensor's DER certificate (hex; colons and case "
                "ignored) to pin instead of CA verification; a self-signed certificate then "
                "works.", env=ENV_FINGERPRINT),
        Setting("tls_verify", bool, True,
                "Verify the vSensor's certificate; false turns verification off (the connection "
                "is then not authenticated, and a warning says so).", env=ENV_TLS_VERIFY),
        Setting("spool_dir", str, "",
                "Folder that keeps chunks on disk while the vSensor is away; empty: memory only "
                "(capture slows down when memory is full).",
                env=ENV_SPOOL_DIR),
        Setting("spool_max_bytes", int, 256 << 20,
                "Largest size of the spool; when full the oldest chunks are dropped (logged and "
                "reported to the vSensor).", env=ENV_SPOOL_MAX_BYTES, minimum=1 << 20),
        Setting("memory_chunks", int, 64,
                "Chunks kept in memory before they move to the spool (or before back-pressure).",
                minimum=1),
        Setting("memory_bytes", int, 16 << 20,
                "Encoded bytes kept in memory before chunks move to the spool (or before "
                "back-pressure); the newest chunk is always taken.", minimum=1 << 20),
        Setting("timeout_seconds", float, 10.0, "Time-out of one HTTP request.", positive=True),
        Setting("shutdown_grace", float, 25.0,
                "Seconds between SIGTERM and the end of the process: chunks are sent until "
                "shortly before, the rest is spooled.", env=ENV_SHUTDOWN_GRACE, minimum=0),
    ])


def normalise_fingerprint(text: str) -> str:
    """Lower-case hex without separators; raises ValueError unless it is a SHA-256."""
    value = text.strip().lower().replace(":", "").replace(" ", "")
    if not _FINGERPRINT.match(value):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return value


def tls_setting(ca_file: str, fingerprint: str,
                tls_verify: bool) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
    """How the transport checks the vSensor's certificate (aiohttp's ``ssl`` argument): the
    pinned fingerprint, else no verification (False), else a TLS 1.2+ context trusting
    ``ca_file`` or the system CAs. ``ossensor diagnose`` uses the same to test the handshake.
    Raises TransportError when the CA file cannot be read."""
    if fingerprint:  # a pin is explicit: it is checked even with VSENSOR_TLS_VERIFY off
        return aiohttp.Fingerprint(bytes.fromhex(normalise_fingerprint(fingerprint)))
    if not tls_verify:
        return False
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot read the CA file {ca_file!r}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    """Refuse an unusable CA file, fingerprint or spool folder before any capture opens."""
    if config.transport != "https":
        return
    settings = config.plugin("https")
    problems = []
    if settings.fingerprint:
        try:
            normalise_fingerprint(settings.fingerprint)
        except ValueError as exc:
            problems.append(f"{ENV_FINGERPRINT}: {exc}")
    if settings.ca_file and not Path(settings.ca_file).is_file():
        problems.append(f"{ENV_CA_FILE}: {settings.ca_file!r} is not a file")
    if settings.spool_dir:
        try:
            Path(settings.spool_dir).mkdir(parents=True, exist_ok=True)
            if not os.access(settings.spool_dir, os.W_OK | os.X_OK):
                problems.append(f"{ENV_SPOOL_DIR}: {settings.spool_dir!r} is not writable")
        except OSError as exc:
            problems.append(f"{ENV_SPOOL_DIR}: cannot create {settings.spool_dir!r} "
                            f"({exc.strerror or exc})")
    if problems:
        raise ConfigError(problems)


@hookimpl
def ossensor_transport(config: SensorConfig, encoder: ChunkEncoder) -> HttpsTransport:
    settings = config.plugin("https")
    return HttpsTransport(
        config.vsensor_hostname, config.vsensor_port, config.hmac_key, config.name, encoder,
        ca_file=settings.ca_file, fingerprint=settings.fingerprint,
        tls_verify=settings.tls_verify, spool_dir=settings.spool_dir,
        spool_bytes=settings.spool_max_bytes, memory_chunks=settings.memory_chunks,
        memory_bytes=settings.memory_bytes,
        timeout_seconds=settings.timeout_seconds, grace_seconds=settings.shutdown_grace)


class Backoff:
    """Exponential back-off with equal jitter: the n-th wait is drawn from [c/2, c] with
    c = min(maximum, minimum * 2**n), so sensors that lost the same vSensor do not retry in step
    and none retries faster than half the current step."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._ceiling = minimum

    def next(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt; ``Retry-After`` (capped at an hour) wins."""
        ceiling = self._ceiling
        self._ceiling = min(self._ceiling * 2, self.maximum)
        if retry_after is not None:
            return min(retry_after, 3600.0)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._ceiling = self.minimum


@dataclass(eq=False)
class _Entry:
    """One accepted chunk: its bytes in memory, or a file in the spool."""

    order: int  # send order: earlier runs' spool first, then accepted order
    sequence: int
    packets: int
    size: int
    payload: bytes | None = None
    path: Path | None = field(default=None)
    digest: tuple[str, str] | None = None  # (algorithm, content_digest(payload)), computed once


class _Answer(Exception):
    """A request that did not succeed; ``state`` says which (for once-per-change logging)."""

    def __init__(self, state: str, message: str, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.state = state
        self.retry_after = retry_after
        self.status = status


class HttpsTransport(Transport):
    """Ships chunks to one vSensor; see the module docstring for the behaviour."""

    name = "https"

    def __init__(self, host: str, port: int, key: str, sensor: str, encoder: ChunkEncoder, *,
                 ca_file: str = "", fingerprint: str = "", tls_verify: bool = True,
                 spool_dir: str = "", spool_bytes: int = 256 << 20, memory_chunks: int = 64,
                 memory_bytes: int = 16 << 20,
                 timeout_seconds: float = 10.0, grace_seconds: float = 25.0,
                 backoff_min: float = 0.5, backoff_max: float = 30.0) -> None:
        self.host, self.port = host, port
        shown_host = f"[{host}]" if ":" in host else host
        self.base_url = f"https://{shown_host}:{port}"
        self._key = key
        self.sensor = sensor
        self.encoder = encoder
        self.ca_file = ca_file
        self.fingerprint = normalise_fingerprint(fingerprint) if fingerprint else ""
        self.tls_verify = tls_verify
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.spool_bytes = spool_bytes
        self.memory_chunks = memory_chunks
        self.memory_bytes = memory_bytes
        self.timeout_seconds = timeout_seconds
        self.grace_seconds = grace_seconds
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.media_type = getattr(encoder, "media_type", "application/vnd.ossensor.chunk.v1")

        self.chunks_sent = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.chunks_spooled = 0
        self.chunks_dropped = 0
        self.packets_dropped = 0
        self.chunks_duplicate = 0  # included in chunks_sent: stored by an earlier attempt
        self.spool_full_chunks = 0  # included in chunks_dropped: the spool limit dropped them
        self.spool_full_packets = 0
        self.reregistrations = 0  # after a 409 (the vSensor forgot us)
        self.chunk_retries = 0  # deliveries that failed and will be tried again
        self.instance = uuid.uuid4().hex  # replaced by the spool folder's, when there is one
        self.primary_address: str | None = None
        self.registered = False
        self.protocol_version: int | None = None
        # The chunk format version sent: 1 (every vSensor reads it) until the vSensor lists a
        # higher one that the encoder writes in its registration answer (``chunk_versions``).
        self.chunk_version = 1
        self.heartbeat_seconds = 10.0
        self.vsensor_filter: str | None = None  # the filter applied last
        self.peer_ranges: AddressSet | None = None  # with it, the peer exclusion (bpfgen)
        self.peer_ranges_id: str | None = None  # the vSensor's id of those ranges
        self.workloads: list[str] = []  # pod CIDRs behind this node, sent at registration
        self._find_workload_ranges = WorkloadFinder()
        self.digest = SHA256  # the body digest signatures use; BLAKE3 once the vSensor takes it

        self._memory: deque[_Entry] = deque()
        self._spool: list[_Entry] = []  # sorted by order
        self._spool_size = 0
        self._order = 0
        self._run_id = time.time_ns()
        self._lock = asyncio.Lock()  # moves between memory and spool vs. taking the next chunk
        self._wakeup = asyncio.Event()  # a chunk was queued, or we are closing
        self._room = asyncio.Event()  # the sender took a chunk out of memory
        self._refresh = asyncio.Event()  # the vSensor said its filters changed: heartbeat now
        self._states: dict[str, str] = {}
        self._failed_filter: tuple[str, AddressSet | None] | None = None
        self._registered_body: dict[str, Any] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._bulk: BulkConnection | None = None
        # The vSensor's own address when registration went through a load balancer that
        # answered with one (``direct``); None: the configured address for everything.
        self._direct: tuple[str, int] | None = None
        self._direct_refused_until = 0.0  # after a failure: back to the load balancer a while
        self._bulk_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._control: SensorControl | None = None
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._in_flight: _Entry | None = None
        self._reported_drops = (0, 0)
        self._closing = False
        self._closed = False

    def __repr__(self) -> str:  # never the key
        return (f"HttpsTransport({self.base_url!r}, sent={self.chunks_sent}, "
                f"queued={self.queued_chunks})")

    @property
    def queued_chunks(self) -> int:
        """Chunks accepted and not yet delivered (memory and spool)."""
        return len(self._memory) + len(self._spool)

    @property
    def spooled_chunks(self) -> int:
        """Chunks in the spool folder now."""
        return len(self._spool)

    @property
    def spooled_bytes(self) -> int:
        """Bytes of the chunks in the spool folder now."""
        return self._spool_size

    @property
    def memory_queued_bytes(self) -> int:
        """Encoded bytes of the chunks queued in memory now."""
        return sum(entry.size for entry in self._memory)

    @property
    def close_budget(self) -> float:
        """How long ``aclose`` keeps delivering: the shutdown grace minus the core's wait for its
        sender (before it calls ``aclose``) and a margin for spooling and exiting; at least 1 s
        (or the whole grace when it is shorter)."""
        return max(self.grace_seconds - SHUTDOWN_GRACE_SECONDS - SHUTDOWN_MARGIN_SECONDS,
                   min(1.0, self.grace_seconds))

    # -- the Transport interface ------------------------------------------------------------

    async def start(self, control: SensorControl) -> None:
        self._control = control
        if self.spool_dir is not None:
            await asyncio.to_thread(self._load_spool)
            self.instance = await asyncio.to_thread(self._load_instance)
        tls = tls_setting(self.ca_file, self.fingerprint, self.tls_verify)
        if tls is False:
            log.warning("%s is false: the vSensor's certificate is not verified, so the "
                        "connection to %s is not authenticated (anyone in the path can pose as "
                        "the vSensor and read the captured traffic)", ENV_TLS_VERIFY,
                        self.base_url)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        self._bulk_thread = named_executor("https-upload", 1)
        self._new_bulk()
        log.info("sending chunks to the vSensor at %s (%s%s)", self.base_url,
                 f"pinned certificate {self.fingerprint[:16]}..." if self.fingerprint
                 else "certificate not verified" if tls is False
                 else f"CA file {self.ca_file}" if self.ca_file else "system CAs",
                 f", spool {self.spool_dir}" if self.spool_dir else ", no spool folder")
        self._task = asyncio.create_task(self._run(), name="https transport")
        self._task.add_done_callback(self._sender_ended)

    async def send(self, chunk: Chunk) -> None:
        if self._closing:
            raise TransportError("the https transport is closed")
        # Encoding (zstd) and hashing release the GIL: on a worker thread they run beside the
        # capture loop instead of stalling it.
        payload, digest = await asyncio.to_thread(self._encode, chunk)
        self._order += 1
        entry = _Entry(self._order, chunk.sequence, chunk.packets, len(payload), payload,
                       digest=digest)
        # Accepted from here on: a cancelled wait below leaves it queued, and aclose keeps it.
        self._memory.append(entry)
        self._wakeup.set()
        while self._memory_full() and not self._closing:
            if self.spool_dir is not None and await self._spill_oldest():
                continue
            self._room.clear()
            await self._room.wait()

    def _new_bulk(self) -> None:
        """A chunk connection to the current target; the old one is closed on its thread."""
        host, port = self._direct or (self.host, self.port)
        if self._bulk is not None and self._bulk_thread is not None:
            self._bulk_thread.submit(self._bulk.close)
        self._bulk = BulkConnection(host, port, client_context(self.ca_file, self.fingerprint,
                                                               self.tls_verify),
                                    self.fingerprint, self.timeout_seconds)

    def _url(self, path: str) -> str:
        """Registration always goes to the configured address; the rest to the vSensor's
        direct address once it gave one."""
        if self._direct is None or path == PATH_REGISTER:
            return self.base_url + path
        host, port = self._direct
        return f"https://{f'[{host}]' if ':' in host else host}:{port}{path}"

    def _use_direct(self, direct: Any) -> None:
        target = None
        if isinstance(direct, dict) and time.monotonic() >= self._direct_refused_until:
            host, port = direct.get("host"), direct.get("port")
            if isinstance(host, str) and host and isinstance(port, int) and 0 < port < 65536 \
                    and (host, port) != (self.host, self.port):
                target = (host, port)
        if target == self._direct:
            return
        self._direct = target
        self._new_bulk()
        if target is not None:
            log.info("the vSensor answered through %s with its own address: talking to %s from "
                     "now on", self.base_url, self._url("").rstrip("/"))

    def _direct_failed(self, failure: _Answer) -> bool:
        """When the direct address fails, go back to the configured one (and register there
        again) for five minutes; True when that happened."""
        if self._direct is None or failure.state not in ("unreachable", "timeout", "tls"):
            return False
        log.warning("the vSensor's direct address %s failed (%s); back to %s", self._url(""),
                    failure, self.base_url)
        self._direct_refused_until = time.monotonic() + DIRECT_RETRY_SECONDS
        self._direct = None
        self._new_bulk()
        return True

    async def _say_goodbye(self) -> None:
        """Tell the vSensor this instance stops, so that the next one (a replaced pod) may use
        the name at once instead of after three heartbeats; best effort, two seconds."""
        try:
            await asyncio.wait_for(self._post_json(
                PATH_HEARTBEAT, {**self._heartbeat_body(), "leaving": True}), 2.0)
        except (_Answer, TimeoutError) as exc:
            log.log(level(1), "could not tell the vSensor that this sensor stops: %s", exc)

    def _memory_full(self) -> bool:
        return len(self._memory) > self.memory_chunks or (
            len(self._memory) > 1 and sum(e.size for e in self._memory) > self.memory_bytes)

    def _encode(self, chunk: Chunk) -> tuple[bytes, tuple[str, str]]:
        version = self.chunk_version
        if version == 1:  # also what an encoder without ``versions`` is asked for
            payload = self.encoder.encode(chunk)
        else:
            # The instance id is ours: stamped here, the body names the same instance as the
            # X-Ossensor-Instance header of every attempt (the spool keeps both across runs).
            chunk = dataclasses.replace(chunk, instance=self.instance)
            payload = self.encoder.encode(chunk, version=version)  # type: ignore[call-arg]
        algorithm = self.digest
        return payload, (algorithm, content_digest(payload, algorithm))

    def _reencode(self, payload: bytes) -> bytes:
        chunk = self.encoder.decode(payload)  # type: ignore[attr-defined]
        if self.chunk_version == 1:
            return self.encoder.encode(chunk)
        return self.encoder.encode(chunk, version=self.chunk_version)  # type: ignore[call-arg]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._wakeup.set()
        self._room.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        deadline = time.monotonic() + self.close_budget
        while (self.queued_chunks or self._in_flight is not None) \
                and time.monotonic() < deadline and self._task is not None \
                and not self._task.done():
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._memory:
            if self.spool_dir is not None:
                while self._memory:
                    if not await self._spill_oldest():
                        break
            if self._memory:
                packets = sum(e.packets for e in self._memory)
                log.error("%d chunks (%d packets) not delivered to the vSensor at %s are lost "
                          "at shutdown%s", len(self._memory), packets, self.base_url,
                          "" if self.spool_dir is None else " (the spool folder failed)")
                self.chunks_dropped += len(self._memory)
                self.packets_dropped += packets
                self._memory.clear()
        if self._spool:
            log.warning("%d chunks (%d bytes) stay in the spool %s for the next run",
                        len(self._spool), self._spool_size, self.spool_dir)
        if self._session is not None:
            if self.registered:
                await self._say_goodbye()
            await self._session.close()
        if self._bulk_thread is not None and self._bulk is not None:
            # Queued behind a post still in flight (bounded by the timeout), then the thread ends.
            self._bulk_thread.submit(self._bulk.close)
            self._bulk_thread.shutdown(wait=False)
        log.info("https transport closed: %d chunks, %d packets, %d bytes sent; %d spooled, "
                 "%d dropped (%d of them because the spool was full)", self.chunks_sent,
                 self.packets_sent, self.bytes_sent, self.chunks_spooled, self.chunks_dropped,
                 self.spool_full_chunks)

    # -- the background task ----------------------------------------------------------------

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the https sender stopped: %r; chunks are kept until shutdown",
                      task.exception(), exc_info=task.exception())

    async def _run(self) -> None:
        await self._register_until_done()
        if not self._closing:
            self._heartbeat = asyncio.create_task(self._heartbeats(), name="https heartbeat")
        await self._send_forever()

    async def _register_until_done(self) -> None:
        backoff = Backoff(self.backoff_min, self.backoff_max)
        while True:
            try:
                await self._register()
                return
            except _Answer as answer:
                self._report("register", answer.state, self._failure_message(
                    answer, "cannot register with", "retrying"))
                await asyncio.sleep(backoff.next(answer.retry_after))

    async def _find_primary_address(self) -> None:
        """The source address this host uses towards the vSensor (a connected UDP socket sends
        nothing); left unset when the name does not resolve or there is no route yet."""
        if self.primary_address is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            family, _, _, _, target = (await loop.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM))[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(target)
                self.primary_address = str(probe.getsockname()[0]).split("%")[0]
        except (OSError, IndexError, ValueError) as exc:
            log.log(level(1), "primary address not found yet (%s)", exc)

    def _register_body(self) -> dict[str, Any]:
        interfaces = self._control.captured_interfaces() if self._control else []
        addresses: list[str] = []
        for interface in interfaces:
            for address in interface.routable_addresses:
                if address not in addresses:
                    addresses.append(address)
        body: dict[str, Any] = {
            "sensor": self.sensor, "versions": list(PROTOCOL_VERSIONS),
            "software": f"ossensor {__version__}", "instance": self.instance,
            "addresses": addresses, "interfaces": [i.name for i in interfaces],
            "workloads": self.workloads, "features": ["peer-ranges", "filter-refresh"]}
        if self.primary_address is not None:
            body["primary_address"] = self.primary_address
        return body

    async def _find_workloads(self) -> None:
        """Pod CIDRs behind this node (``ossensor_core.node.workloads``; netlink, in a thread); none
        when routes cannot be read (the others then keep our traffic too: duplicates)."""
        try:
            self.workloads = await asyncio.to_thread(self._find_workload_ranges)
        except InterfaceError as exc:
            self._report("workloads", "failed", f"{exc}; registering without workload ranges")
            self.workloads = []
        else:
            self._report("workloads", "ok", "workload ranges readable again")

    async def _register(self) -> None:
        await self._find_workloads()
        await self._find_primary_address()
        body = self._register_body()
        answer = await self._post_json(PATH_REGISTER, body)
        version = answer.get("version")
        if version not in PROTOCOL_VERSIONS:
            raise _Answer("version", f"the vSensor picked protocol version {version!r}; this "
                          f"sensor speaks {list(PROTOCOL_VERSIONS)}")
        self.protocol_version = version
        self._use_direct(answer.get("direct"))
        digests = answer.get("digests")
        self.digest = next((d for d in DIGESTS if isinstance(digests, list) and d in digests),
                           SHA256)
        seconds = answer.get("heartbeat_seconds")
        if isinstance(seconds, (int, float)) and seconds > 0:
            self.heartbeat_seconds = float(seconds)
        readable = answer.get("chunk_versions")
        self.chunk_version = max((v for v in getattr(self.encoder, "versions", (1,))
                                  if isinstance(readable, list) and v in readable), default=1)
        self._registered_body = body
        self.registered = True
        self._report("register", "ok", None)
        log.info("registered with the vSensor at %s (protocol %d, chunk format %d, %d addresses, "
                 "%d interfaces)", self.base_url, version, self.chunk_version,
                 len(body["addresses"]), len(body["interfaces"]))
        self._apply_filter(answer.get("filter"), answer.get("peer_ranges"))

    def refresh(self) -> None:
        """Send the next heartbeat (which brings the vSensor's filter) now."""
        self._refresh.set()

    async def _heartbeats(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), self.heartbeat_seconds)
            self._refresh.clear()
            try:
                await self._heartbeat_once()
            except Exception:  # a bug must not end heartbeats (and filter updates) for good
                log.exception("heartbeat failed")

    def _heartbeat_body(self) -> dict[str, Any]:
        stats = self._control.capture_stats() if self._control else {}
        body: dict[str, Any] = {
            "interfaces": {name: {"packets": s.packets, "drops": s.drops}
                           for name, s in stats.items()},
            "dropped": {"chunks": self.spool_full_chunks, "packets": self.spool_full_packets}}
        note = "; ".join(getattr(self._control, "filter_notes", None) or ())
        if note:  # e.g. the peer exclusion did not fit: shown on the vSensor's status page
            body["filter_note"] = note
        if self.peer_ranges_id is not None:
            body["peer_ranges_id"] = self.peer_ranges_id
        return body

    async def _heartbeat_once(self) -> None:
        """One heartbeat (or a new registration when our interfaces changed)."""
        await self._find_workloads()
        if self._register_body() != self._registered_body:
            # Interfaces or addresses changed: the vSensor's filters for the peers need them.
            with contextlib.suppress(_Answer):
                await self._register()
            return
        body = self._heartbeat_body()
        dropped = (self.spool_full_chunks, self.spool_full_packets)
        if dropped != self._reported_drops:
            self._reported_drops = dropped
            log.warning("%d chunks (%d packets) dropped so far because the spool %s was full; "
                        "reporting it to the vSensor", *dropped, self.spool_dir)
        try:
            answer = await self._post_json(PATH_HEARTBEAT, body)
        except _Answer as failure:
            self._report("heartbeat", failure.state, f"heartbeat to the vSensor at "
                         f"{self.base_url} failed: {failure}")
            if self._direct_failed(failure):
                with contextlib.suppress(_Answer):
                    await self._register()
                return
            if failure.status in (404, 409):  # the vSensor no longer knows us
                with contextlib.suppress(_Answer):
                    await self._register()
            return
        self._report("heartbeat", "ok", f"heartbeats to {self.base_url} work again")
        self._apply_filter(answer.get("filter"), answer.get("peer_ranges"))

    def _apply_filter(self, expression: Any, peer_ranges: Any = None) -> None:
        """Apply the vSensor's expression and, when it sends them, its peer ranges (sent again
        only when their ``id`` changes); the previous filter stays when the new one fails."""
        if not isinstance(expression, str) or self._control is None:
            return
        expression = expression.strip()
        peers, peers_id = None, None
        if isinstance(peer_ranges, dict):
            peers_id = peer_ranges.get("id")
            if "ranges" in peer_ranges:
                try:
                    peers = AddressSet.parse(peer_ranges["ranges"])
                except (TypeError, ValueError) as exc:
                    log.error("the vSensor's peer ranges are malformed (keeping the current "
                              "filter): %s", exc)
                    return
            elif peers_id == self.peer_ranges_id:
                peers = self.peer_ranges
            else:  # a new id without its ranges: keep ours, ask again next time
                peers, peers_id = self.peer_ranges, None
        wanted = (expression, peers)
        if wanted == (self.vsensor_filter, self.peer_ranges) or wanted == self._failed_filter:
            self.peer_ranges_id = peers_id
            return
        try:
            if peers is None or not len(peers):
                self._control.set_vsensor_filter(expression)
            else:
                self._control.set_vsensor_filter(expression, peers)
        except FilterError as exc:
            self._failed_filter = wanted
            log.error("cannot apply the vSensor's filter %r (keeping %r): %s", expression,
                      self.vsensor_filter or "", exc)
            return
        self._failed_filter = None
        self.vsensor_filter, self.peer_ranges, self.peer_ranges_id = expression, peers, peers_id
        log.info("applied the vSensor's filter %r%s", expression,
                 f" and peer exclusion {peers!r}" if peers is not None else "")

    async def _send_forever(self) -> None:
        backoff = Backoff(self.backoff_min, self.backoff_max)
        conflicts = 0  # 409s since the last delivery
        while True:
            async with self._lock:
                entry = self._take()
            if entry is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._in_flight = entry
            try:
                delivered = await self._deliver(entry)
            except _Answer as answer:
                self._put_back(entry)
                self.chunk_retries += 1
                if self._direct_failed(answer):
                    await self._register_until_done()
                    continue
                if answer.status == 409:  # the vSensor forgot us (it restarted): register again
                    self._report("chunks", answer.state, f"the vSensor at {self.base_url} does "
                                 f"not know this sensor ({answer}); registering again, "
                                 f"{self.queued_chunks} chunks kept", logging.WARNING)
                    conflicts += 1
                    if conflicts > 1:  # 409 again right after registering: do not hammer it
                        await asyncio.sleep(backoff.next(answer.retry_after))
                    self.reregistrations += 1
                    await self._register_until_done()
                    continue
                self._report("chunks", answer.state, self._failure_message(
                    answer, "cannot deliver chunks to", f"{self.queued_chunks} chunks kept, "
                    "retrying"))
                await asyncio.sleep(backoff.next(answer.retry_after))
                continue
            except BaseException:
                self._put_back(entry)
                raise
            finally:
                self._in_flight = None
            backoff.reset()
            conflicts = 0
            self._forget(entry)
            if not delivered:
                continue
            self._report("chunks", "ok", f"the vSensor at {self.base_url} takes chunks again "
                         f"({self.queued_chunks} queued)")

    def _failure_message(self, answer: _Answer, what: str, then: str) -> str:
        if answer.status == 401:
            return (f"vSensor rejected the key or the clock ({what} {self.base_url}): "
                    f"{answer}; {then}")
        return f"{what} the vSensor at {self.base_url}: {answer}; {then}"

    def _take(self) -> _Entry | None:
        """The oldest queued chunk (spool and memory), removed while it is in flight."""
        if self._spool and (not self._memory or self._spool[0].order < self._memory[0].order):
            return self._spool.pop(0)
        if self._memory:
            entry = self._memory.popleft()
            self._room.set()
            return entry
        return None

    def _put_back(self, entry: _Entry) -> None:
        if entry.path is not None:
            bisect.insort(self._spool, entry, key=lambda e: e.order)
        else:
            self._memory.appendleft(entry)

    def _forget(self, entry: _Entry) -> None:
        if entry.path is not None:
            self._unlink(entry)

    async def _deliver(self, entry: _Entry) -> bool:
        """POST one chunk; True when stored, False when refused for good (400)."""
        payload = entry.payload
        if payload is None:
            assert entry.path is not None
            try:
                payload = await asyncio.to_thread(entry.path.read_bytes)
            except OSError as exc:
                log.error("cannot read spooled chunk %s (%s); %d packets lost", entry.path,
                          exc.strerror or exc, entry.packets)
                self._count_drop(entry)
                return False
        digest = entry.digest
        if len(payload) > 4 and payload[4] > self.chunk_version \
                and hasattr(self.encoder, "decode"):
            # Encoded for a vSensor that read a newer format; this one (a rollback) does not.
            payload = await asyncio.to_thread(self._reencode, payload)
            digest = None
        headers = {"Content-Type": self.media_type, H_SEQUENCE: str(entry.sequence),
                   H_INSTANCE: self.instance}
        status, text, retry_after = await self._post_chunk(payload, headers, digest)
        log.log(level(2), "chunk %d: %d packets, %d bytes -> %d", entry.sequence, entry.packets,
                len(payload), status)
        if status == 200:
            if '"duplicate"' in text:
                self.chunks_duplicate += 1
            self.chunks_sent += 1
            self.packets_sent += entry.packets
            self.bytes_sent += len(payload)
            return True
        reason = _reason(text)
        if status == 400:
            log.error("the vSensor refused chunk %d as malformed (%s); dropped its %d packets",
                      entry.sequence, reason, entry.packets)
            self._count_drop(entry)
            return False
        raise _Answer(_state(status), f"HTTP {status} ({reason})", retry_after, status)

    def _count_drop(self, entry: _Entry) -> None:
        self.chunks_dropped += 1
        self.packets_dropped += entry.packets

    # -- HTTP -------------------------------------------------------------------------------

    async def _post(self, path: str, body: bytes, headers: dict[str, str],
                    digest: str | None = None) -> tuple[int, str, float | None]:
        """One signed POST (a new nonce and timestamp every time); connection problems are
        raised as _Answer."""
        if self._session is None:
            raise _Answer("closed", "the transport was not started")
        headers = {**headers, H_VERSION: str(self.protocol_version or max(PROTOCOL_VERSIONS)),
                   H_INSTANCE: self.instance,
                   **sign(self._key, "POST", path, body, self.sensor, digest=digest)}
        try:
            async with self._session.post(self._url(path), data=body,
                                          headers=headers) as response:
                text = self._without_key(await response.text(errors="replace"))
                return response.status, text, _retry_after(response.headers.get("Retry-After"))
        except aiohttp.ServerFingerprintMismatch:
            raise _Answer("tls", "the vSensor's certificate does not match the pinned "
                          "fingerprint") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _Answer("tls", f"the vSensor's certificate is not trusted "
                          f"({exc.certificate_error})") from None
        except TimeoutError:
            raise _Answer("timeout", f"no answer within {self.timeout_seconds:g} s") from None
        except aiohttp.ClientError as exc:
            raise _Answer("unreachable", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise _Answer("unreachable", f"{exc.strerror or exc}") from None

    async def _post_chunk(self, body: bytes, headers: dict[str, str],
                          digest: tuple[str, str] | None) -> tuple[int, str, float | None]:
        """One signed chunk POST on the bulk connection's thread (see bulk.py for why)."""
        if self._bulk is None or self._bulk_thread is None:
            raise _Answer("closed", "the transport was not started")
        headers = {**headers, H_VERSION: str(self.protocol_version or max(PROTOCOL_VERSIONS))}
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(self._bulk_thread, self._signed_post, body,
                                                headers, digest)
        except BulkError as exc:
            raise _Answer(exc.state, str(exc)) from None
        return answer.status, self._without_key(answer.text), _retry_after(answer.retry_after)

    def _without_key(self, text: str) -> str:
        """An answer's text, safe to log: we never send the key, and never log it either."""
        return text.replace(self._key, "***") if self._key and self._key in text else text

    def _signed_post(self, body: bytes, headers: dict[str, str],
                     digest: tuple[str, str] | None) -> BulkAnswer:
        """Sign (hashing again only if the vSensor's digests changed) and POST; bulk thread."""
        assert self._bulk is not None
        algorithm = self.digest
        known = digest[1] if digest is not None and digest[0] == algorithm else None
        headers.update(sign(self._key, "POST", PATH_CHUNKS, body, self.sensor, digest=known,
                            algorithm=algorithm))
        return self._bulk.post(PATH_CHUNKS, body, headers)

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, text, retry_after = await self._post(
            path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        log.log(level(2), "%s -> %d", path, status)
        if status != 200:
            reason = _reason(text)
            if status == 426:
                reason = f"no common protocol version: {reason}"
            raise _Answer(_state(status), f"HTTP {status} ({reason})", retry_after, status)
        try:
            answer = json.loads(text)
        except ValueError:
            raise _Answer("bad-answer", "the vSensor's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise _Answer("bad-answer", "the vSensor's answer is not a JSON object")
        return answer

    def _report(self, topic: str, state: str, message: str | None,
                severity: int | None = None) -> None:
        """Log ``message`` only when ``topic`` changes state, not once per attempt; "ok" after a
        failure is logged as a recovery. Failures are errors (heartbeats: warnings) unless
        ``severity`` says otherwise."""
        previous = self._states.get(topic)
        if previous == state:
            return
        self._states[topic] = state
        if message is None:
            return
        if state == "ok":
            if previous is not None:
                log.info("%s", message)
        elif severity is not None:
            log.log(severity, "%s", message)
        elif topic == "heartbeat":
            log.warning("%s", message)
        else:
            log.error("%s", message)

    # -- the spool --------------------------------------------------------------------------

    async def _spill_oldest(self) -> bool:
        """Move the oldest chunk in memory to the spool; False when the spool cannot take it."""
        async with self._lock:
            if not self._memory:
                return True
            entry = self._memory.popleft()
            try:
                path = await asyncio.to_thread(self._write_spool, entry)
            except OSError as exc:
                self._memory.appendleft(entry)
                self._report("spool", "failed", f"cannot write to the spool {self.spool_dir} "
                             f"({exc.strerror or exc}); keeping chunks in memory")
                return False
            except BaseException:
                self._memory.appendleft(entry)
                raise
            self._report("spool", "ok", f"the spool {self.spool_dir} works again")
            entry.path, entry.payload = path, None
            bisect.insort(self._spool, entry, key=lambda e: e.order)
            self._spool_size += entry.size
            self.chunks_spooled += 1
            self._enforce_spool_limit()
            return True

    def _write_spool(self, entry: _Entry) -> Path:
        assert self.spool_dir is not None and entry.payload is not None
        name = f"{self._run_id:020d}-{entry.sequence:020d}-{entry.packets}{SPOOL_SUFFIX}"
        final = self.spool_dir / name
        temporary = self.spool_dir / (name + TEMP_SUFFIX)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(entry.payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        os.close(fd)
        os.replace(temporary, final)
        return final

    def _enforce_spool_limit(self) -> None:
        while self._spool_size > self.spool_bytes and self._spool:
            oldest = self._spool.pop(0)
            self._unlink(oldest)
            self._count_drop(oldest)
            self.spool_full_chunks += 1
            self.spool_full_packets += oldest.packets
            log.error("spool %s is full (%d bytes allowed): dropped the oldest chunk %d "
                      "(%d packets); %d chunks dropped so far", self.spool_dir, self.spool_bytes,
                      oldest.sequence, oldest.packets, self.chunks_dropped)

    def _unlink(self, entry: _Entry) -> None:
        if entry.path is None:
            return
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove spooled chunk %s: %s", entry.path, exc.strerror or exc)
        self._spool_size -= entry.size
        entry.path = None

    def _load_instance(self) -> str:
        """The instance id kept in the spool folder, created on first use; a fresh one for this
        process (with a warning) when the file cannot be read or written."""
        assert self.spool_dir is not None
        path = self.spool_dir / INSTANCE_FILE
        try:
            kept = path.read_text(encoding="ascii").strip()
            if _INSTANCE.match(kept):
                return kept
            log.warning("%s does not hold an instance id; making a new one", path)
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s (%s); making a new instance id", path, exc)
        instance = uuid.uuid4().hex
        temporary = path.with_name(INSTANCE_FILE + TEMP_SUFFIX)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         FILE_MODE)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(instance + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot keep the instance id in %s (%s); it lasts for this process only",
                        path, exc.strerror or exc)
        return instance

    def _load_spool(self) -> None:
        """Queue the chunks an earlier run left in the spool, oldest first."""
        assert self.spool_dir is not None
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            names = os.listdir(self.spool_dir)
        except OSError as exc:
            raise TransportError(f"cannot use the spool folder {str(self.spool_dir)!r}: "
                                 f"{exc.strerror or exc}") from exc
        found = []
        for name in names:
            path = self.spool_dir / name
            if name.endswith(TEMP_SUFFIX):  # a write that a crash interrupted
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            match = _SPOOL_NAME.match(name)
            if not match:
                if name.endswith(SPOOL_SUFFIX):
                    log.warning("%s in the spool is not named like a chunk of ours; left alone",
                                path)
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            found.append((int(match[1]), int(match[2]), int(match[3]), size, path))
        for run, sequence, packets, size, path in sorted(found):
            self._order += 1
            self._spool.append(_Entry(self._order, sequence, packets, size, path=path))
            self._spool_size += size
        if found:
            log.info("%d chunks (%d bytes) from an earlier run are in the spool %s; sending "
                     "them first", len(found), self._spool_size, self.spool_dir)
        self._enforce_spool_limit()


def _state(status: int) -> str:
    return f"{status}"


def _reason(text: str) -> str:
    """The vSensor's reason (``{"error": ...}``), short; never our own key (we never send it)."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        text = str(answer["error"])
    elif isinstance(answer, dict) and "supported" in answer:
        text = f"the vSensor supports {answer['supported']}"
    text = " ".join(text.split())
    return text[:200] or "no reason given"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number; an HTTP date is rarely used by servers)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0)
