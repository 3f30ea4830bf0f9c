"""Antigena trusts the vSensor as the core's settings say, whichever transport is loaded.

With ``OSSENSOR_TRANSPORT=file`` the https plugin is not loaded; ``VSENSOR_CA_FILE`` must still
reach Antigena's websocket (it once belonged to the https plugin, and Antigena then failed
certificate verification and retried forever). A real TLS server with a trustme CA; no mocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

import pytest
import trustme
from aiohttp import WSMsgType, web

from ossensor_core.pipeline.config import SensorConfig, read_core_config
from ossensor_core.pipeline.loading import load_plugins
from ossensor_core.pipeline.startup import plugin_settings
from ossensor_core.wire.names import PATH_ANTIGENA
from ossensor_core.wire.signing import NonceCache, verify
from ossensor_plugins.antigena import tls_for
from ossensor_plugins.antigena.service import Antigena
from tests.helpers.vsensor_process import free_port

HOST = "127.0.0.1"
KEY = "antigena-tls-test-key"
CA = trustme.CA()


def file_transport_config(environ: dict[str, str]) -> SensorConfig:
    """The configuration as start-up builds it, with the file transport and Antigena loaded."""
    config, problems = read_core_config(environ)
    assert config.transport == "file" and config.antigena_enabled
    plugins = load_plugins(config.capture_backend, config.transport, config.plugins,
                           config.disabled_plugins, antigena=True)
    assert ("transport", "https") not in plugins.loaded
    config = dataclasses.replace(config, plugin_settings=plugin_settings(plugins, environ,
                                                                         problems))
    assert not problems
    return config


async def open_websocket(config: SensorConfig, port: int) -> bool:
    """Whether Antigena's own client opens its websocket to a server on ``port``."""
    received: list[str] = []

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        verify([KEY], "GET", PATH_ANTIGENA, request.headers, b"", NonceCache(600))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        received.append("open")
        async for message in ws:
            if message.type == WSMsgType.CLOSE:
                break
        return ws

    app = web.Application()
    app.router.add_get(PATH_ANTIGENA, websocket)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert(HOST).configure_cert(context)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, ssl_context=context).start()
    service = Antigena(host=HOST, port=port, key=KEY, sensor=config.name, tls=tls_for(config),
                       period=5.0, enforcers=[], reconnect_max=0.5)
    task = asyncio.create_task(service._connect_forever())
    try:
        await asyncio.wait_for(service.connected.wait(), 5.0)
        return received == ["open"]
    except TimeoutError:
        return False
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()



@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"VSENSOR_HOSTNAME": HOST, "VSENSOR_HMAC_KEY": KEY, "OSSENSOR_NAME": "node-1",
            "OSSENSOR_TRANSPORT": "file", "ANTIGENA_ENABLED": "true",
            "OSSENSOR_CONFIG_PATH": str(tmp_path / "ossensor.cfg")}


def test_antigena_honours_the_ca_file_with_the_file_transport(environ, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca_file))
    config = file_transport_config({**environ, "VSENSOR_CA_FILE": str(ca_file)})
    assert isinstance(tls_for(config), ssl.SSLContext)
    assert asyncio.run(open_websocket(config, free_port()))


def test_without_the_ca_file_the_certificate_is_not_trusted(environ) -> None:
    config = file_transport_config(environ)  # the system CAs do not know the test CA
    assert not asyncio.run(open_websocket(config, free_port()))
