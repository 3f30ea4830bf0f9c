"""The Antigena operator and a sensor's websocket against a vSensor served by
:func:`tests.helpers.vsensor.running`."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from ossensor_core.wire.names import PATH_ACTIONS
from ossensor_core.wire.signing import H_VERSION, PATH_ANTIGENA, sign
from tests.helpers.vsensor import KEY, SENSOR

TOKEN = "operator-token-7f3a"


async def operator(client, method: str, path: str = PATH_ACTIONS, body=None,
                   token: str | None = TOKEN, headers: dict[str, str] | None = None):
    """An operator request; returns (status, parsed JSON)."""
    all_headers = {"Authorization": f"Bearer {token}"} if token else {}
    all_headers.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    async with client.session.request(method, client.base + path, data=data,
                                      headers=all_headers) as r:
        return r.status, await r.json(content_type=None)


async def connect(client, sensor: str = SENSOR, key: str = KEY):
    """A sensor's Antigena websocket, its upgrade signed like every sensor request."""
    headers = {H_VERSION: "1", **sign(key, "GET", PATH_ANTIGENA, b"", sensor)}
    return await client.session.ws_connect(client.base + PATH_ANTIGENA, headers=headers)


async def receive(ws, timeout: float = 1.0) -> dict:
    """The next JSON message on a websocket."""
    message = await asyncio.wait_for(ws.receive(), timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)
