"""The Antigena plugin's handling of a filters-changed message (no socket involved)."""

from __future__ import annotations

import asyncio
import json

from ossensor_plugins.antigena.service import Antigena


def test_filters_message_asks_the_sensor_to_refresh_its_filter():
    calls: list[str] = []
    service = Antigena(host="192.0.2.254", port=8443, key="not-used-here", sensor="node-1",
                       tls=False, period=5.0, enforcers=[],
                       on_filters_changed=lambda: calls.append("refresh"))

    async def scenario() -> None:
        await service._on_message(json.dumps({"type": "filters"}))
        await service._on_message(json.dumps({"type": "no-such-type"}))

    asyncio.run(scenario())
    assert calls == ["refresh"]
    assert [r["reason"] for r in service.rejected] == ["unknown message type 'no-such-type'"]
