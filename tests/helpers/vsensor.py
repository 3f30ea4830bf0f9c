"""A real vSensor on 127.0.0.1 over TLS (trustme), and signed aiohttp client requests."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from ossensor_vsensor.app import VSENSOR, VSensorSettings, create_app

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk
from ossensor_core.wire.chunk import MEDIA_TYPE, ChunkCodec
from ossensor_core.wire.signing import H_VERSION, PATH_CHUNKS, PATH_REGISTER, sign
from tests.helpers.vsensor_process import DOCUMENTATION_RANGES

KEY = "Kx9secretHMACkey42"
SENSOR = "node-1"


@pytest.fixture(scope="session")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a throw-away CA."""
    return tls_contexts()


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for 127.0.0.1 and localhost, from a throw-away CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def settings(tmp_path: Path, **changes) -> VSensorSettings:
    values = dict(data_dir=tmp_path / "data", keys=[KEY], rotate_seconds=300.0,
                  claims_allow=[DOCUMENTATION_RANGES])
    values.update(changes)
    return VSensorSettings(**values)


def ether_frame(n: int) -> bytes:
    """A small Ethernet/IPv4/UDP frame; ``n`` goes into the payload."""
    payload = n.to_bytes(4, "big") * 4
    udp = (1234).to_bytes(2, "big") + (5678).to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    length = 20 + len(udp)
    ip = bytes([0x45, 0, length >> 8, length & 0xFF, 0, 0, 0, 0, 64, 17, 0, 0,
                192, 0, 2, 10, 192, 0, 2, 20])
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00" + ip + udp


def raw_frame(n: int) -> bytes:
    return ether_frame(n)[14:]


def make_chunk(sequence: int, sensor: str = SENSOR, packets: int = 3,
               raw_packets: int = 0) -> Chunk:
    start = 1_764_262_800_000_000_000
    batches = [PacketBatch.from_frames(
        "eth0", 2, 1, [(start + i * 1000, len(ether_frame(i)), ether_frame(i))
                       for i in range(packets)])]
    if raw_packets:
        batches.append(PacketBatch.from_frames(
            "wg0", 5, 101, [(start + i, len(raw_frame(i)), raw_frame(i))
                            for i in range(raw_packets)]))
    return Chunk(sensor, sequence, tuple(batches), start)


@dataclass
class Client:
    session: aiohttp.ClientSession
    base: str
    app: web.Application
    runner: web.AppRunner
    codec: ChunkCodec = field(default_factory=ChunkCodec)

    @property
    def vsensor(self):
        return self.app[VSENSOR]

    async def post(self, path: str, body: bytes, key: str = KEY, sensor: str = SENSOR,
                   now: float | None = None, headers: dict[str, str] | None = None,
                   signed: dict[str, str] | None = None):
        """POST a signed request; returns (status, parsed JSON or text, headers)."""
        all_headers = {H_VERSION: "1", **(signed or sign(key, "POST", path, body, sensor,
                                                          now=now))}
        all_headers.update(headers or {})
        async with self.session.post(self.base + path, data=body, headers=all_headers) as r:
            text = await r.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = text
            return r.status, data, r.headers

    async def register(self, sensor: str = SENSOR, addresses=("192.0.2.10",), versions=(1,),
                       key: str = KEY, instance: str | None = None):
        message = {"sensor": sensor, "versions": list(versions), "software": "ossensor 0.1.0",
                   "addresses": list(addresses), "interfaces": ["eth0"]}
        if instance is not None:
            message["instance"] = instance
        return await self.post(PATH_REGISTER, json.dumps(message).encode(), key=key,
                               sensor=sensor,
                               headers={"X-Ossensor-Instance": instance} if instance else None)

    async def send_chunk(self, chunk: Chunk, key: str = KEY, sensor: str | None = None,
                         headers_extra: dict[str, str] | None = None, **kwargs):
        body = self.codec.encode(chunk)
        return await self.post(PATH_CHUNKS, body, key=key, sensor=sensor or chunk.sensor,
                               headers={"Content-Type": MEDIA_TYPE,
                                        "X-Ossensor-Chunk-Sequence": str(chunk.sequence),
                                        **(headers_extra or {})},
                               **kwargs)

    async def get(self, path: str, token: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.get(self.base + path, headers=headers) as r:
            return r.status, await r.text()

    async def shutdown(self) -> None:
        """Stop the server (completes the open files); idempotent."""
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def running(vsettings: VSensorSettings, tls) -> AsyncIterator[Client]:
    server_ctx, client_ctx = tls
    app = create_app(vsettings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_ctx)) as session:
            yield Client(session, f"https://127.0.0.1:{port}", app, runner)
    finally:
        await runner.cleanup()


def stored_files(data_dir: Path, sensor: str = SENSOR) -> list[Path]:
    folder = data_dir / sensor
    # Not the journal (.chunks): only what the vSensor stored for users.
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) \
        if folder.is_dir() else []
