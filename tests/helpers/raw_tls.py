"""A vSensor behind its GuardedSite (``server.py``) on loopback over TLS, and raw HTTP/1.1 over
TLS for clients that misbehave: stray bytes in headers, half requests, trickled bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ossensor_vsensor.app import VSENSOR, create_app
from ossensor_vsensor.server import start_guarded
from ossensor_vsensor.settings import VSensorSettings


@dataclass
class Guarded:
    port: int
    client_ctx: ssl.SSLContext
    app: object

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def open(self, host: str = "127.0.0.1"
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection, from ``host`` (another loopback address: another client)."""
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.client_ctx,
                                             server_hostname="127.0.0.1",
                                             local_addr=(host, 0))


@contextlib.asynccontextmanager
async def guarded(vsettings: VSensorSettings, tls) -> AsyncIterator[Guarded]:
    server_ctx, client_ctx = tls
    app = create_app(vsettings)
    runner, site = await start_guarded(app, vsettings, app[VSENSOR].counts, "127.0.0.1", 0,
                                       server_ctx)
    try:
        yield Guarded(site.port, client_ctx, app)
    finally:
        await runner.cleanup()


def request_head(method: str, path: str, headers: dict[str, str | bytes],
                 length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    for name, value in headers.items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes)
                                              else value.encode()))
    if length is not None:
        lines.append(f"Content-Length: {length}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def response(reader: asyncio.StreamReader, timeout: float = 5.0
                   ) -> tuple[int, dict[str, str]]:
    """Status and JSON body of one answer (the connection is read up to the body's end)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"text": body.decode(errors="replace")}


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the vSensor closed the connection (fails past ``seconds``)."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await reader.read(1 << 16):
                pass
    return time.monotonic() - started


