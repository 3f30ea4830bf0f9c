"""Who may talk to the vSensor: signed sensor requests, and the admin token for operators.

Every sensor request is verified with :func:`ossensor_core.wire.signing.verify` before its body
is looked at. A failure answers 401 with the :class:`~ossensor_core.wire.names.Reason` code the
error carries, logs the precise message (never a key) and stores nothing. A genuine request can
still be refused with 409: ``unknown_sensor`` (register again) or ``name_in_use`` (another live
process holds the sensor's name).
"""

from __future__ import annotations

import hmac
import json
import logging

from aiohttp import web

from ossensor_core.wire.names import (AUTHORIZATION, H_INSTANCE, H_SENSOR, H_VERSION,
                                      PATH_REGISTER, PROTOCOL_VERSIONS, Reason)
from ossensor_core.wire.signing import AuthError, NonceCache, Verified, negotiate, verify

from .answers import refusal
from .metrics import Metrics
from .registry import SensorRegistry
from .settings import VSensorSettings

log = logging.getLogger("ossensor_vsensor")


def auth_reason(error: AuthError) -> str:
    """The reason code of an AuthError: the 401's ``error`` and a metric label.

    Codes tell the sensor's operator what to fix (clock, key, a proxy that rewrites bodies)
    without helping anyone guess a key. A malformed sensor name or nonce counts as a missing
    header: only a broken client sends one.
    """
    return error.code


def bearer_token_matches(request: web.Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (compared in constant
    time)."""
    scheme, _, given = request.headers.get(AUTHORIZATION, "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


class Authenticator:
    """Verifies sensor requests and refuses the ones this vSensor cannot take."""

    def __init__(self, settings: VSensorSettings, registry: SensorRegistry,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.nonces = NonceCache(settings.skew_seconds)

    async def authenticate(self, request: web.Request) -> tuple[Verified, bytes]:
        """Read the body and verify the request; raise an HTTP error response otherwise."""
        body = await request.read()
        now = self.settings.now()
        try:
            verified = verify(self.settings.keys, request.method, request.raw_path,
                              request.headers, body, self.nonces, now=now,
                              skew_seconds=self.settings.skew_seconds)
        except AuthError as exc:
            reason = auth_reason(exc)
            self.metrics.auth_failures[reason] += 1
            log.warning("refused %s %s from %s (sensor %r): %s", request.method, request.path,
                        request.remote, request.headers.get(H_SENSOR, "?")[:64], exc)
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": reason, "server_time": self.settings.now()}),
                content_type="application/json") from None
        if request.path != PATH_REGISTER:
            offered = request.headers.get(H_VERSION)
            if offered is not None and negotiate(_ints(offered)) is None:
                raise web.HTTPUpgradeRequired(
                    text=json.dumps({"supported": list(PROTOCOL_VERSIONS)}),
                    content_type="application/json")
        state = self.registry.state(verified.sensor)
        instance = request.headers.get(H_INSTANCE, "")
        if not state.instance or not instance or instance == state.instance:
            state.last_seen = self.settings.now()  # not by another instance under the name
        return verified, body

    def refuse_unknown_sensor(self, sensor: str, request: web.Request) -> web.Response | None:
        """409 ``unknown_sensor`` when ``sensor`` has not registered since this process
        started, else None.

        409 rather than 401: the request is genuine, the sensor only has to register again
        (after a restart of the vSensor its filter and addresses are unknown here).
        """
        if self.registry.is_registered(sensor):
            return None
        self.metrics.auth_failures[Reason.UNKNOWN_SENSOR] += 1
        log.warning("refused %s %s from %s: sensor %r has not registered", request.method,
                    request.path, request.remote, sensor[:64])
        return refusal(Reason.UNKNOWN_SENSOR, self.settings.now(), 409)

    def refuse_name_in_use(self, sensor: str, instance: str,
                           request: web.Request) -> web.Response | None:
        """409 ``name_in_use`` when another instance (another process, usually another host)
        holds ``sensor`` and was seen within three heartbeats, else None.

        Two live sensors with one name are reported, never merged: their packets would land in
        one folder and their filters would fight. The newcomer keeps its chunks and retries;
        once the other falls silent (a replaced pod), it takes the name over.
        """
        state = self.registry.get(sensor)
        if not instance or state is None or not self.registry.held_by_another(state, instance):
            return None
        state.conflict = {"instance": instance[:64], "address": str(request.remote),
                          "at": self.settings.now()}
        self.metrics.auth_failures[Reason.NAME_IN_USE] += 1
        log.warning("refused %s %s from %s: sensor name %r is in use by instance %s (seen "
                    "%.0f s ago), this is instance %s: two sensors with one name "
                    "(OSSENSOR_NAME)", request.method, request.path, request.remote,
                    sensor[:64], state.instance[:12], self.settings.now() - state.last_seen,
                    instance[:12])
        return refusal(Reason.NAME_IN_USE, self.settings.now(), 409)

    def refuse_unless_holder(self, sensor: str, request: web.Request) -> web.Response | None:
        """The refusal for a request of a registered sensor's process (heartbeat, chunk):
        ``unknown_sensor`` or ``name_in_use``, else None."""
        return self.refuse_unknown_sensor(sensor, request) or self.refuse_name_in_use(
            sensor, request.headers.get(H_INSTANCE, ""), request)


def check_admin_token(settings: VSensorSettings, request: web.Request) -> None:
    """Raise 401 unless the request carries the admin token (when one is configured)."""
    token = settings.admin_token
    if not token:
        return
    if not bearer_token_matches(request, token):
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "admin token required"}),
            content_type="application/json", headers={"WWW-Authenticate": "Bearer"})


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return []
