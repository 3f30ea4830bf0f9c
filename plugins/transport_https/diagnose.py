"""The https transport's checks for ``ossensor diagnose``: the path to the vSensor.

Each step in order, each later one only when the path to it works: DNS, TCP, the TLS handshake
(the certificate is read in a first, unverified handshake so that it is shown even when
verification fails), the clocks, a registration (``"probe": true``: verified and answered,
nothing recorded), the filter the vSensor hands out, a test chunk (verified, not stored) and
Antigena's websocket. Everything a sensor sends is built by ``ossensor_core.client``, as the
transport builds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ossensor_core.capture.bpf import combine_filters
from ossensor_core.client import (AiohttpTls, VSensorTls, base_url, new_instance, read_instance,
                                  registration_body, signed_headers)
from ossensor_core.errors import TransportError
from ossensor_core.ops.diagnose import (VSENSOR_CHECKS, Check, Context, certificate_text,
                                        connect_error, describe_certificate, filter_check,
                                        fingerprint_text, getaddrinfo, ok, skip, tls_action)
from ossensor_core.ops.diagnose.network import CLOCK_WARNING_SECONDS, EXPIRY_WARNING_DAYS
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.contracts import Chunk
from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.wire.names import (DEFAULT_SKEW_SECONDS, H_CHUNK_SEQUENCE, H_SERVER_TIME,
                                      H_TEST, MAX_ANSWER_BYTES, MAX_FILTER_CHARS, PATH_ANTIGENA,
                                      PATH_CHUNKS, PATH_REGISTER)

from .answers import read_bounded

#: Variables whose invalid value makes every vSensor check meaningless.
NEEDED_VARIABLES = {"VSENSOR_HOSTNAME", "VSENSOR_PORT", "VSENSOR_CA_FILE",
                    "VSENSOR_TLS_FINGERPRINT", "OSSENSOR_HTTPS_TIMEOUT_SECONDS"}


def vsensor_checks(config: SensorConfig, ctx: Context) -> list[Check]:
    """The vSensor checks (``VSENSOR_CHECKS``, in order), skipped when their settings are bad."""
    bad = sorted(ctx.bad_variables & NEEDED_VARIABLES)
    if bad or not config.vsensor_hostname:
        bad = bad or ["VSENSOR_HOSTNAME"]
        return [skip(i, f"needs {', '.join(f'config.{v}' for v in bad)}")
                for i in VSENSOR_CHECKS]
    return asyncio.run(VSensorProbe(config, ctx).run())


class VSensorProbe:
    """The vSensor checks, in order; each later one runs only when the path to it works."""

    def __init__(self, config: SensorConfig, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx
        self.https = config.plugin("https")
        self.timeout = float(self.https.timeout_seconds)
        host = config.vsensor_hostname
        self.base_url = base_url(host, config.vsensor_port)
        self.host = host
        self.tls: AiohttpTls | None = None
        self.vsensor_filter: str | None = None
        self.primary_address: str | None = None  # our side of the TCP connection
        self.registered = False

    async def run(self) -> list[Check]:
        checks: list[Check] = []

        def skip_after(check_id: str, why: str) -> list[Check]:
            return checks + [skip(i, why)
                             for i in VSENSOR_CHECKS[VSENSOR_CHECKS.index(check_id) + 1:]]

        addresses, check = await self.resolve()
        checks.append(check)
        if not addresses:
            return skip_after("vsensor.dns", "needs vsensor.dns")
        address, check = await self.connect(addresses)
        checks.append(check)
        if address is None:
            return skip_after("vsensor.tcp", "needs vsensor.tcp")
        check = await self.handshake(address)
        checks.append(check)
        if check.status == "fail":
            return skip_after("vsensor.tls", "needs vsensor.tls")
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.tls, limit=2),
                timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            checks.append(await self.clock(session))
            if not self.config.hmac_key:
                return skip_after("vsensor.clock", "needs config.VSENSOR_HMAC_KEY")
            checks.append(await self.register(session))
            if not self.registered:  # the rest is signed the same way: it would fail alike
                return skip_after("vsensor.register", "needs vsensor.register")
            checks.append(self.filter())
            checks.append(await self.test_chunk(session))
            checks.append(await self.antigena(session))
        return checks

    async def resolve(self) -> tuple[list[tuple[int, str]], Check]:
        loop = asyncio.get_running_loop()
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self.host else socket.AF_INET, self.host)
        except OSError:
            pass
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            return [(family, self.host)], ok("vsensor.dns", f"{self.host} is an IP address: "
                                                             "no name to resolve",
                                              addresses=[self.host])
        started = time.perf_counter()
        try:
            infos = await asyncio.wait_for(getaddrinfo(loop, self.host, self.config.vsensor_port),
                                           self.timeout)
        except (OSError, TimeoutError) as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else \
                (exc.strerror or str(exc))
            return [], Check("vsensor.dns", "fail", f"{self.host!r} does not resolve: {reason}",
                             "fix VSENSOR_HOSTNAME, or the DNS (resolv.conf) of the sensor's "
                             "network", {"host": self.host})
        elapsed = (time.perf_counter() - started) * 1000
        addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
        shown = ", ".join(a for _, a in addresses)
        return addresses, ok("vsensor.dns", f"{self.host} resolves to {shown} in "
                                             f"{elapsed:.1f} ms",
                              addresses=[a for _, a in addresses], milliseconds=elapsed)

    async def connect(self, addresses: list[tuple[int, str]]) -> tuple[str | None, Check]:
        port = self.config.vsensor_port
        failures: list[tuple[str, str]] = []
        for _, address in addresses:
            target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            started = time.perf_counter()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(address, port),
                                                   self.timeout)
            except (OSError, TimeoutError) as exc:
                failures.append(connect_error(exc, target, self.timeout))
                continue
            elapsed = (time.perf_counter() - started) * 1000
            self.primary_address = str(writer.get_extra_info("sockname")[0]).split("%")[0]
            writer.close()
            await writer.wait_closed()
            return address, ok("vsensor.tcp", f"connected to {target} in {elapsed:.1f} ms",
                                address=address, port=port, milliseconds=elapsed)
        return None, Check("vsensor.tcp", "fail", "; ".join(f for f, _ in failures),
                           failures[-1][1], {"port": port})

    async def _handshake(self, address: str, context: ssl.SSLContext) -> ssl.SSLObject:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            address, self.config.vsensor_port, ssl=context, server_hostname=self.host,
            ssl_handshake_timeout=self.timeout), self.timeout)
        try:
            return writer.get_extra_info("ssl_object")
        finally:
            writer.close()
            with contextlib.suppress(OSError):  # the peer may leave first: no finding
                await writer.wait_closed()

    async def handshake(self, address: str) -> Check:
        """The handshake as the transport makes it; the certificate is read in a first,
        unverified handshake so that it is shown even when verification fails."""
        try:
            self.tls = VSensorTls.from_config(self.config).for_aiohttp()
        except (TransportError, ValueError) as exc:
            return Check("vsensor.tls", "fail", str(exc), "fix VSENSOR_CA_FILE or "
                                                          "VSENSOR_TLS_FINGERPRINT")
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        unverified.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls_object = await self._handshake(address, unverified)
            der = tls_object.getpeercert(binary_form=True)
            version = tls_object.version()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
            return Check("vsensor.tls", "fail", f"no TLS handshake with {address}: {reason}",
                         "check that VSENSOR_PORT is the vSensor's HTTPS port (not plain HTTP "
                         "or another service)")
        cert = describe_certificate(der or b"")
        data = {"version": version, "certificate": cert}
        text = f"{version}, {certificate_text(cert)}"
        if isinstance(self.tls, aiohttp.Fingerprint):
            pinned = self.tls.fingerprint
            actual = bytes.fromhex(cert["fingerprint"].replace(":", ""))
            if actual != pinned:
                return Check("vsensor.tls", "fail",
                             f"{text}: does not match VSENSOR_TLS_FINGERPRINT "
                             f"({fingerprint_text(pinned)})",
                             "pin the fingerprint the vSensor logs at start, or fix "
                             "VSENSOR_HOSTNAME if this is another server", data)
            return Check("vsensor.tls", "ok", f"{text}: matches the pinned fingerprint",
                         data=data)
        if self.tls is False:
            return Check("vsensor.tls", "warning", f"{text}: not verified",
                         "VSENSOR_TLS_VERIFY is false: pin VSENSOR_TLS_FINGERPRINT or give "
                         "VSENSOR_CA_FILE so that the vSensor is authenticated", data)
        try:
            await self._handshake(address, self.tls)
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or str(exc)
            data["reason"] = reason
            return Check("vsensor.tls", "fail", f"{text}: verification fails: {reason}",
                         tls_action(reason), data)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            return Check("vsensor.tls", "fail", f"{text}: verified handshake failed: {exc}",
                         "check the vSensor's TLS configuration", data)
        days = cert.get("days_left")
        if days is not None and days < EXPIRY_WARNING_DAYS:
            return Check("vsensor.tls", "warning", f"{text}: verified, expires soon",
                         "renew the vSensor's certificate", data)
        return Check("vsensor.tls", "ok", f"{text}: verified", data=data)

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return signed_headers(self.config.hmac_key, self.config.name, method, path, body)

    async def _request(self, session: aiohttp.ClientSession, check: str, method: str,
                       path: str, body: bytes, headers: Mapping[str, str],
                       ) -> tuple[int, Any, Mapping[str, str], float] | Check:
        """(status, JSON or text, headers, local time at the middle of the exchange), or the
        failed ``check`` when nothing answers."""
        started = time.time()
        try:
            async with session.request(method, self.base_url + path, data=body,
                                       headers=dict(headers)) as r:
                raw = await read_bounded(r.content, MAX_ANSWER_BYTES)
                text = "(an answer over 8 MiB, not read)" if raw is None else \
                    raw.decode(errors="replace")
                middle = (started + time.time()) / 2
                status, answer_headers = r.status, r.headers
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Check(check, "fail", f"no answer: {exc or type(exc).__name__}",
                         "check the vSensor's logs")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            answer = text
        return status, answer, answer_headers, middle

    async def clock(self, session: aiohttp.ClientSession) -> Check:
        """Every answer of the vSensor carries its time: a GET of the registration path is
        answered 405 without counting as an authentication failure there."""
        exchange = await self._request(session, "vsensor.clock", "GET", PATH_REGISTER, b"", {})
        if isinstance(exchange, Check):
            return exchange
        status, answer, headers, middle = exchange
        server: float | None = None
        try:
            server = float(headers[H_SERVER_TIME])
        except (KeyError, ValueError):
            if isinstance(answer, dict) and isinstance(answer.get("server_time"), (int, float)):
                server = float(answer["server_time"])
        if server is not None and not math.isfinite(server):
            server = None  # NaN or infinity: no time at all
        if server is None:
            return Check("vsensor.clock", "warning", f"HTTP {status} without the vSensor's "
                                                     "time", "is this an ossensor vSensor?")
        offset = server - middle
        data = {"offset_seconds": round(offset, 3), "window_seconds": DEFAULT_SKEW_SECONDS}
        figure = (f"the vSensor's clock is {offset:+.1f} s from this host's "
                  f"(signatures are accepted within ±{DEFAULT_SKEW_SECONDS} s)")
        if abs(offset) > DEFAULT_SKEW_SECONDS:
            return Check("vsensor.clock", "fail", figure,
                         "synchronise the clocks (NTP) of this node and the vSensor: every "
                         "signed request is refused as clock_skew", data)
        if abs(offset) > CLOCK_WARNING_SECONDS:
            return Check("vsensor.clock", "warning", figure,
                         "the clocks drift apart: check NTP on this node and the vSensor", data)
        return Check("vsensor.clock", "ok", figure, data=data)

    def _instance(self) -> str:
        """The instance id the transport keeps in its spool folder, read only; else a new one."""
        spool = self.https.spool_dir
        return (read_instance(Path(spool)) if spool else None) or new_instance()

    async def register(self, session: aiohttp.ClientSession) -> Check:
        """The registration the sensor sends (the vSensor keeps the last one it got, so the
        body must match the https transport's); 401's reason tells a wrong key from the rest."""
        # Verified and answered, nothing recorded: a running sensor is not disturbed.
        message = registration_body(self.config.name, self._instance(), self.ctx.selected,
                                    primary_address=self.primary_address, probe=True)
        addresses = message["addresses"]
        body = json.dumps(message).encode()
        headers = {"Content-Type": "application/json",
                   **self._headers("POST", PATH_REGISTER, body)}
        exchange = await self._request(session, "vsensor.register", "POST", PATH_REGISTER,
                                       body, headers)
        if isinstance(exchange, Check):
            return exchange
        status, answer, _, _ = exchange
        reason = answer.get("error") if isinstance(answer, dict) else None
        data = {"status": status, "reason": reason, "sensor": self.config.name}
        if status == 200 and isinstance(answer, dict):
            self.registered = True
            self.vsensor_filter = str(answer.get("filter") or "")[:MAX_FILTER_CHARS]
            data["version"] = version = str(answer.get("version"))[:20]
            figure = (f"the vSensor accepts {self.config.name!r} (protocol "
                      f"{version}, addresses: {', '.join(addresses) or 'none'})")
            if answer.get("name_in_use") is True:
                data["name_in_use"] = True
                return Check("vsensor.register", "warning",
                             f"{figure}, but another live sensor holds this name",
                             "unless that is this host's running sensor, give each sensor its "
                             "own OSSENSOR_NAME (the DaemonSet uses the node name)", data)
            return Check("vsensor.register", "ok", figure, data=data)
        if status == 401 and reason == "bad_signature":
            return Check("vsensor.register", "fail",
                         "HTTP 401 bad_signature: the vSensor does not accept this key",
                         "set VSENSOR_HMAC_KEY to a key the vSensor accepts (the same "
                         "Secret on both sides)", data)
        if status == 401 and reason == "clock_skew":
            return Check("vsensor.register", "fail",
                         "HTTP 401 clock_skew: the key was not even tried, the timestamp is "
                         "outside the vSensor's window", "fix the clock (see vsensor.clock)",
                         data)
        if status == 426:
            return Check("vsensor.register", "fail", f"HTTP 426: no common protocol version "
                                                     f"({answer})",
                         "upgrade the sensor or the vSensor", data)
        return Check("vsensor.register", "fail", f"HTTP {status} {reason or answer!s:.200}",
                     "check the vSensor's logs for this sensor's requests", data)

    def filter(self) -> Check:
        """The vSensor's filter AND-ed with ours, as the sensor will apply it."""
        combined = combine_filters(self.vsensor_filter or "", self.ctx.kernel_filter or "")
        return filter_check("vsensor.filter", combined, self.ctx.linktypes(),
                            "the vSensor's filter AND-ed with BPF")

    async def test_chunk(self, session: aiohttp.ClientSession) -> Check:
        codec = ChunkCodec()
        body = codec.encode(Chunk(self.config.name, 0, (), time.time_ns()))
        headers = {"Content-Type": codec.media_type, H_CHUNK_SEQUENCE: "0", H_TEST: "1",
                   **self._headers("POST", PATH_CHUNKS, body)}
        exchange = await self._request(session, "vsensor.test_chunk", "POST", PATH_CHUNKS, body,
                                       headers)
        if isinstance(exchange, Check):
            return exchange
        status, answer, _, _ = exchange
        data = {"status": status, "answer": answer if isinstance(answer, dict) else None}
        if status == 200 and isinstance(answer, dict) and answer.get("test") is True:
            return Check("vsensor.test_chunk", "ok", "a test chunk was verified and "
                                                     "acknowledged (not stored)", data=data)
        if status == 200:
            return Check("vsensor.test_chunk", "warning",
                         f"the vSensor answered {answer!s:.100} instead of a test "
                         "acknowledgement", "upgrade the vSensor", data)
        return Check("vsensor.test_chunk", "fail", f"HTTP {status} {answer!s:.200}",
                     "check the vSensor's logs", data)

    async def antigena(self, session: aiohttp.ClientSession) -> Check:
        if not self.config.antigena_enabled:
            return skip("antigena.websocket", "ANTIGENA_ENABLED is false")
        headers = self._headers("GET", PATH_ANTIGENA, b"")
        try:
            async with session.ws_connect(self.base_url + PATH_ANTIGENA, headers=headers,
                                          autoclose=True, heartbeat=None) as ws:
                try:  # the vSensor greets with the actions in force; not waiting long for it
                    greeting = await ws.receive_json(timeout=min(self.timeout, 2.0))
                except (TimeoutError, ValueError, TypeError):
                    greeting = None
                await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                return Check("antigena.websocket", "warning",
                             f"not available: the vSensor answers 404 for {PATH_ANTIGENA}",
                             "this vSensor sends no response actions; set "
                             "ANTIGENA_ENABLED=false to silence this", {"status": 404})
            return Check("antigena.websocket", "fail", f"the websocket does not open: HTTP "
                                                       f"{exc.status} {exc.message}",
                         "check the vSensor's logs (a proxy must pass websocket upgrades)",
                         {"status": exc.status})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Check("antigena.websocket", "fail", f"the websocket does not open: "
                                                       f"{exc or type(exc).__name__}",
                         "check the vSensor's logs", {})
        actions = greeting.get("actions") if isinstance(greeting, dict) else None
        told = f", {len(actions)} actions in force" if isinstance(actions, list) else ""
        return Check("antigena.websocket", "ok", f"the websocket {PATH_ANTIGENA} opens{told}",
                     data={"status": 101, "actions": len(actions) if actions is not None
                           else None})
