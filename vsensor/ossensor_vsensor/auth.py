"""Who may talk to the vSensor: signed sensor requests, and the admin token for operators.

Every sensor request is verified from its headers alone before a byte of its body is read
(:func:`ossensor_core.wire.signing.verify_headers`): its declared length (chunked bodies are
refused), its headers' form, the sensor name, the timestamp window, the signature and the
nonce. Only then is the body read, against ``body_seconds`` and within a budget of body bytes
in flight, and compared with its signed digest. A failure answers with the
:class:`~ossensor_core.wire.names.Reason` code the error carries (401, or 400 for a malformed
header or sensor name), logs one line (never a key) and stores nothing. A genuine request can
still be refused with 409: ``unknown_sensor`` (register again) or ``name_in_use`` (another live
process holds the sensor's name).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
from collections.abc import Callable

from aiohttp import web

from ossensor_core.wire.names import (AUTHORIZATION, H_CHUNK_SEQUENCE, H_INSTANCE, H_SENSOR,
                                      H_TEST, H_VERSION, PATH_REGISTER, PROTOCOL_VERSIONS,
                                      Reason)
from ossensor_core.wire.signing import AuthError, Verified, negotiate, verify_headers

from .answers import refusal
from .cluster.nonces import SharedNonces
from .cluster.registry import ClusterUnavailable
from .metrics import Metrics
from .nonces import NONCE_FILE, JournaledNonces
from .registry import SensorRegistry, SensorState
from .settings import VSensorSettings

log = logging.getLogger("ossensor_vsensor")

#: Answers other than 401 for reasons found in the headers: the request is malformed, not
#: unauthenticated, and retrying it unchanged cannot help.
_STATUS = {Reason.BAD_SENSOR_NAME: 400, Reason.BAD_HEADER: 400}
#: A request's share of the body budget, kept until its answer is written (``release_body``).
_BODY_SHARE = web.RequestKey("ossensor_body_share", int)
RETRY_AFTER_SECONDS = 5
#: A body up to this size is read (and dropped) after a refusal from the headers, within
#: DRAIN_SECONDS, so that its sender sees the answer; beyond, the connection is closed unread.
DRAIN_BYTES = 64 << 10
DRAIN_SECONDS = 1.0


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
    # A header's stray bytes arrive as surrogates: they match no token, and must not raise.
    given_bytes = given.strip().encode("utf-8", "surrogatepass")
    return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, token.encode())


class Authenticator:
    """Verifies sensor requests and refuses the ones this vSensor cannot take."""

    def __init__(self, settings: VSensorSettings, registry: SensorRegistry,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.nonces = JournaledNonces(settings.data_dir / NONCE_FILE, settings.skew_seconds,
                                      settings.now())
        self.body_bytes_in_flight = 0
        #: Cluster mode: the replay check shared by every replica (set at start).
        self.shared_nonces: SharedNonces | None = None

    async def authenticate(self, request: web.Request,
                           limit: int | None = None) -> tuple[Verified, bytes]:
        """Verify the request's headers, then read its body and check its digest; raise an
        HTTP error response otherwise. Nothing of the body is read before the headers pass.
        ``limit``: the largest body this endpoint takes (default: ``client_max_size``)."""
        length = self._declared_length(request, limit or self.settings.client_max_size)
        try:
            _check_optional_headers(request)
            signed = verify_headers(self.settings.keys, request.method, request.raw_path,
                                    request.headers, self.nonces, now=self.settings.now(),
                                    skew_seconds=self.settings.skew_seconds)
        except AuthError as exc:
            raise await self._unread(request, length, self._refused(request, exc)) from None
        if request.path != PATH_REGISTER:
            offered = request.headers.get(H_VERSION)
            if offered is not None and negotiate(_ints(offered)) is None:
                raise await self._unread(request, length, web.HTTPUpgradeRequired(
                    text=json.dumps({"supported": list(PROTOCOL_VERSIONS)}),
                    content_type="application/json"))
        self._reserve_body(request, length)
        try:
            async with asyncio.timeout(self.settings.body_seconds):
                body = await request.read()
        except TimeoutError:
            raise self._input_refusal(
                request, Reason.BODY_TIMEOUT, web.HTTPRequestTimeout,
                f"body of {length} bytes not received within {self.settings.body_seconds:g} s",
                close=True) from None
        try:
            verified = signed.check_body(body)
        except AuthError as exc:
            raise self._refused(request, exc) from None
        if self.shared_nonces is not None:
            await self._claim_shared(request, signed.nonce)
        state = self.registry.state(verified.sensor)
        instance = request.headers.get(H_INSTANCE, "")
        if not state.instance or not instance or instance == state.instance:
            state.last_seen = self.settings.now()  # not by another instance under the name
            self.registry.touch(state)
        return verified, body

    async def _claim_shared(self, request: web.Request, nonce: str) -> None:
        """Cluster mode: the nonce, new here, must be new to every replica (``401 replay``
        as on one vSensor), and without NATS nothing is taken (``503``)."""
        try:
            fresh = await self.shared_nonces.claim(nonce)  # type: ignore[union-attr]
        except ClusterUnavailable as exc:
            raise self.cluster_unavailable(request, f"replay check: {exc}") from None
        if not fresh:
            raise self._refused(request, AuthError(
                Reason.REPLAY, "nonce already used on another replica (replay)")) from None

    def cluster_unavailable(self, request: web.Request,
                            detail: str) -> web.HTTPServiceUnavailable:
        """``503 busy`` with ``Retry-After``: cluster state (NATS) does not answer, and a
        request is never taken without it. Counted under ``busy``, one log line."""
        self.metrics.auth_failures[Reason.BUSY] += 1
        log.warning("refused %s %s from %s (sensor %r): NATS unavailable (%s)",
                    request.method, request.path, request.remote,
                    _shown(request.headers.get(H_SENSOR, "?")), detail[:200])
        return web.HTTPServiceUnavailable(
            text=json.dumps({"error": Reason.BUSY, "server_time": self.settings.now()}),
            content_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def _declared_length(self, request: web.Request, limit: int) -> int:
        """The body's declared length, refused when missing (chunked) or over the limit."""
        if "Transfer-Encoding" in request.headers:
            raise self._input_refusal(request, Reason.LENGTH_REQUIRED, web.HTTPLengthRequired,
                                      "chunked body: Content-Length is required", close=True)
        length = request.content_length or 0
        if length > limit:
            raise self._input_refusal(
                request, Reason.BODY_TOO_LARGE, functools.partial(
                    web.HTTPRequestEntityTooLarge, limit, length),
                f"Content-Length {length} is over the limit of {limit}", close=True)
        return length

    def _reserve_body(self, request: web.Request, length: int) -> None:
        """Count ``length`` against the body budget until the answer (:meth:`release_body`)."""
        if length and self.body_bytes_in_flight + length > self.settings.max_body_bytes_in_flight:
            raise self._input_refusal(
                request, Reason.BUSY, web.HTTPServiceUnavailable,
                f"{self.body_bytes_in_flight} body bytes in flight, {length} more would pass "
                f"the limit of {self.settings.max_body_bytes_in_flight}", close=True,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.body_bytes_in_flight += length
        request[_BODY_SHARE] = length

    def release_body(self, request: web.Request) -> None:
        """Give a request's share of the body budget back (its handler is done)."""
        self.body_bytes_in_flight -= request.get(_BODY_SHARE, 0)
        request[_BODY_SHARE] = 0

    def _refused(self, request: web.Request, error: AuthError) -> web.HTTPException:
        """The answer to a request whose headers or body digest failed: 401 (400 for a
        malformed header or name) with the reason code, one log line. The connection is closed
        when the body was not read."""
        reason = auth_reason(error)
        self.metrics.auth_failures[reason] += 1
        log.warning("refused %s %s from %s (sensor %r): %s", request.method, request.path,
                    request.remote, _shown(request.headers.get(H_SENSOR, "?")), error)
        status = _STATUS.get(reason, 401)
        exception = (web.HTTPBadRequest if status == 400 else web.HTTPUnauthorized)(
            text=json.dumps({"error": reason, "server_time": self.settings.now()}),
            content_type="application/json")
        return exception

    async def _unread(self, request: web.Request, length: int,
                      answer: web.HTTPException) -> web.HTTPException:
        """``answer`` to a request refused from its headers, its body unread. A small body
        (registrations, heartbeats: up to :data:`DRAIN_BYTES`) is read and dropped so that
        the client, still sending it, gets the answer (its reason code and the vSensor's clock)
        instead of a reset; a larger one closes the connection unread."""
        if length <= DRAIN_BYTES:
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    await request.content.readexactly(length)
                return answer
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                pass
        answer.force_close()
        return answer

    def _input_refusal(self, request: web.Request, reason: str,
                       answer: Callable[..., web.HTTPException], message: str, close: bool,
                       headers: dict[str, str] | None = None) -> web.HTTPException:
        """A refusal found before the body was read (or while): the status of ``answer``,
        the reason code, one log line."""
        self.metrics.auth_failures[reason] += 1
        log.warning("refused %s %s from %s (sensor %r): %s", request.method, request.path,
                    request.remote, _shown(request.headers.get(H_SENSOR, "?")), message)
        exception = answer(text=json.dumps({"error": reason, "server_time": self.settings.now()}),
                           content_type="application/json", headers=headers)
        if close:
            exception.force_close()
        return exception

    def close(self) -> None:
        self.nonces.close()

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
        return self._name_in_use(state, instance, request, state.instance, "",
                                 state.last_seen or 0.0)

    def refuse_name_held(self, sensor: str, instance: str, holder: SensorState,
                         request: web.Request) -> web.Response:
        """409 ``name_in_use``: ``holder`` (a record of the shared registry, cluster mode)
        says another live instance holds ``sensor`` through replica ``holder.replica``."""
        return self._name_in_use(self.registry.state(sensor), instance, request, holder.instance,
                                 f" through replica {holder.replica[:64]!r}",
                                 holder.last_seen or 0.0)

    def _name_in_use(self, state: SensorState, instance: str, request: web.Request,
                     holder: str, through: str, seen: float) -> web.Response:
        """409 ``name_in_use``, recorded on ``state`` (shown on the status) and logged once."""
        now = self.settings.now()
        state.conflict = {"instance": instance[:64], "address": str(request.remote), "at": now}
        self.metrics.auth_failures[Reason.NAME_IN_USE] += 1
        log.warning("refused %s %s from %s: sensor name %r is in use by instance %s%s (seen "
                    "%.0f s ago), this is instance %s: two sensors with one name "
                    "(OSSENSOR_NAME)", request.method, request.path, request.remote,
                    state.name[:64], holder[:12], through, now - seen, instance[:12])
        return refusal(Reason.NAME_IN_USE, now, 409)

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


def _check_optional_headers(request: web.Request) -> None:
    """The protocol's unsigned headers, when present, are printable ASCII (they are logged,
    compared and shown): AuthError ``bad_header`` otherwise."""
    for name in (H_INSTANCE, H_CHUNK_SEQUENCE, H_TEST, H_VERSION):
        value = request.headers.get(name)
        if value is not None and (len(value) > 256 or not (value.isascii()
                                                           and value.isprintable())):
            raise AuthError(Reason.BAD_HEADER, f"{name} is not printable ASCII (or too long)")


def _shown(text: str) -> str:
    """A header value fit for one log line: bounded, stray bytes escaped by ``%r``."""
    return text[:64]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return []
