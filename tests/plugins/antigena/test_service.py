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


def test_metrics_from_the_plugins_own_objects():
    """``ossensor_metrics``: nothing before start-up; then the actions, the websocket and what
    the reset enforcers sent."""
    from ossensor_plugins.antigena import AntigenaPlugin
    from ossensor_plugins.antigena.resets import ResetEnforcer

    plugin = AntigenaPlugin()
    assert plugin.ossensor_metrics(config=None) is None
    first, second = ResetEnforcer(10.0), ResetEnforcer(10.0)
    first.resets_sent, second.resets_sent, second.probes_sent, first.rate_limited = 3, 4, 2, 1
    plugin.service = Antigena(host="192.0.2.254", port=8443, key="k", sensor="node-1", tls=False,
                              period=5.0, enforcers=[first, second])
    plugin.service.actions_received = 5
    samples = {s.name: s for s in plugin.ossensor_metrics(config=None)}
    assert {name: (s.value, s.kind) for name, s in samples.items()} == {
        "ossensor_antigena_actions": (0, "gauge"),
        "ossensor_antigena_connected": (0, "gauge"),
        "ossensor_antigena_actions_received": (5, "counter"),
        "ossensor_antigena_resets": (7, "counter"),
        "ossensor_antigena_probes": (2, "counter"),
        "ossensor_antigena_resets_rate_limited": (1, "counter")}
    assert samples["ossensor_antigena_resets"].help == "TCP resets sent."
