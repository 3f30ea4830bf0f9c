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
``Retry-After`` says, within 1 s to 300 s); 413 splits the chunk and sends its parts at once
(``split.py``; a single record refused is dropped, counted and logged). Every number and size in
an answer is bounded before use (``docs/protocol.md``); a filter or range set that breaks a
bound or does not apply is refused whole and reported in the heartbeats' ``filter_note``.
Failures are logged once per change of state, not per attempt. The HMAC key is used for signing
only and never logged.

The modules: ``transport.py`` (the sender: memory queue, delivery, shutdown), ``spool.py``,
``registration.py`` (registration and heartbeats), ``filters.py`` (the vSensor's filter and peer
ranges), ``connection.py`` and ``bulk.py`` (posting), ``answers.py`` (answers and back-off),
``split.py`` (a chunk refused as too large),
``diagnose.py`` (the vSensor checks of ``ossensor diagnose``). TLS set-up, the instance id, the
registration body and request signing are the core's vSensor client (``ossensor_core.client``),
shared with Antigena and diagnose.

Settings: ``OSSENSOR_SPOOL_DIR``, ``OSSENSOR_SPOOL_MAX_BYTES``, ``OSSENSOR_SHUTDOWN_GRACE``,
``OSSENSOR_HTTPS_MEMORY_CHUNKS``, ``OSSENSOR_HTTPS_TIMEOUT_SECONDS``; the core's
``VSENSOR_CA_FILE``, ``VSENSOR_TLS_FINGERPRINT`` and ``VSENSOR_TLS_VERIFY``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ossensor_core.client import (ENV_CA_FILE, ENV_FINGERPRINT, INSTANCE_FILE, VSensorTls,
                                  normalise_fingerprint, tls_setting)
from ossensor_core.errors import ConfigError
from ossensor_core.ops.diagnose import Check, Context
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.contracts import ChunkEncoder
from ossensor_core.pipeline.sensor import SHUTDOWN_GRACE_SECONDS
from ossensor_core.pipeline.settings import Setting, SettingsGroup
from ossensor_core.plugin import hookimpl

from .answers import Backoff
from .diagnose import vsensor_checks
from .transport import HttpsTransport

__all__ = ["INSTANCE_FILE", "SHUTDOWN_GRACE_SECONDS", "Backoff", "HttpsTransport",
           "normalise_fingerprint", "tls_setting"]

ENV_SPOOL_DIR = "OSSENSOR_SPOOL_DIR"
ENV_SPOOL_MAX_BYTES = "OSSENSOR_SPOOL_MAX_BYTES"
ENV_SHUTDOWN_GRACE = "OSSENSOR_SHUTDOWN_GRACE"


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("https", [
        Setting("spool_dir", str, "",
                "Folder that keeps chunks on disk while the vSensor is away; empty: memory only "
                "(capture slows down when memory is full).",
                env=ENV_SPOOL_DIR),
        Setting("spool_max_bytes", int, 256 << 20,
                "Largest size of the spool; when full the oldest chunks are dropped (logged and "
                "reported to the vSensor).", env=ENV_SPOOL_MAX_BYTES, minimum=1 << 20,
                maximum=1 << 50),
        Setting("memory_chunks", int, 64,
                "Chunks kept in memory before they move to the spool (or before back-pressure).",
                minimum=1, maximum=1 << 16),
        Setting("memory_bytes", int, 16 << 20,
                "Encoded bytes kept in memory before chunks move to the spool (or before "
                "back-pressure); the newest chunk is always taken.", minimum=1 << 20,
                maximum=1 << 36),
        Setting("timeout_seconds", float, 10.0, "Time-out of one HTTP request.", positive=True,
                maximum=3600),
        Setting("shutdown_grace", float, 25.0,
                "Seconds between SIGTERM and the end of the process: chunks are sent until "
                "shortly before, the rest is spooled.", env=ENV_SHUTDOWN_GRACE, minimum=0,
                maximum=3600),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    """Refuse an unusable CA file, fingerprint or spool folder before any capture opens."""
    if config.transport != "https":
        return
    settings = config.plugin("https")
    tls = VSensorTls.from_config(config)
    problems = []
    if tls.fingerprint:
        try:
            normalise_fingerprint(tls.fingerprint)
        except ValueError as exc:
            problems.append(f"{ENV_FINGERPRINT}: {exc}")
    if tls.ca_file and not Path(tls.ca_file).is_file():
        problems.append(f"{ENV_CA_FILE}: {tls.ca_file!r} is not a file")
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
    tls = VSensorTls.from_config(config)
    return HttpsTransport(
        config.vsensor_hostname, config.vsensor_port, config.hmac_key, config.name, encoder,
        ca_file=tls.ca_file, fingerprint=tls.fingerprint, tls_verify=tls.verify,
        spool_dir=settings.spool_dir, spool_bytes=settings.spool_max_bytes,
        memory_chunks=settings.memory_chunks, memory_bytes=settings.memory_bytes,
        timeout_seconds=settings.timeout_seconds, grace_seconds=settings.shutdown_grace)


@hookimpl
def ossensor_diagnose(config: SensorConfig, context: Context) -> list[Check]:
    """The path to the vSensor, step by step (``diagnose.py``)."""
    return vsensor_checks(config, context)
