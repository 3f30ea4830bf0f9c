"""The JSON answers every endpoint shares: errors for the sensor's log, refusals with a code."""

from __future__ import annotations

from aiohttp import web


def error_answer(status: int, message: str, **headers: str) -> web.Response:
    """``{"error": message}``: a human-readable reason (bad input, storage trouble)."""
    return web.json_response({"error": message}, status=status, headers=headers or None)


def refusal(reason: str, server_time: float, status: int) -> web.Response:
    """``{"error": <reason code>, "server_time": ...}``: a :class:`~ossensor_core.wire.names.Reason`
    the sensor acts on, with the vSensor's clock so it can tell skew from a wrong key."""
    return web.json_response({"error": reason, "server_time": server_time}, status=status)
