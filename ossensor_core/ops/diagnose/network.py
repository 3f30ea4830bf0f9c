"""Helpers for checks that talk to a server: the certificate it shows, why a connection or a
verification failed and what to do about it, a name resolution that cannot hold up the exit.
The vSensor checks themselves come from the plugins that talk to it (``ossensor_diagnose``)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

#: A clock this far from the vSensor's works but is drifting: worth fixing before it fails.
CLOCK_WARNING_SECONDS = 30.0
#: A certificate that expires within this many days gets a warning.
EXPIRY_WARNING_DAYS = 14


def _fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def describe_certificate(der: bytes) -> dict[str, Any]:
    """Subject, issuer, expiry and SHA-256 fingerprint of a DER certificate.

    Decoded by the ``ssl`` module's own decoder (``_ssl._test_decode_cert``, the one behind
    ``getpeercert()``) because the certificate of a failed handshake must be shown too and the
    image has no other X.509 parser; when that private helper is missing only the fingerprint
    is reported.
    """
    found: dict[str, Any] = {"fingerprint": _fingerprint(der)}
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return found
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:
        pem.write(ssl.DER_cert_to_PEM_cert(der))
        pem.flush()
        try:
            decoded = decode(pem.name)
        except (ssl.SSLError, ValueError):
            return found

    def name(parts: Iterable[Any]) -> str:
        return ", ".join(f"{k}={v}" for rdn in parts for k, v in rdn)

    found["subject"] = name(decoded.get("subject", ()))
    found["issuer"] = name(decoded.get("issuer", ()))
    not_after = decoded.get("notAfter")
    if not_after:
        expires = ssl.cert_time_to_seconds(not_after)
        found["not_after"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
        found["days_left"] = round((expires - time.time()) / 86400, 1)
    found["names"] = [v for _, v in decoded.get("subjectAltName", ())]
    return found


def certificate_text(cert: Mapping[str, Any]) -> str:
    parts = [f"subject {cert.get('subject') or '(empty)'}", f"issuer {cert.get('issuer', '?')}"]
    if "not_after" in cert:
        parts.append(f"expires {cert['not_after']} ({cert['days_left']:+g} days)")
    parts.append(f"SHA-256 {cert['fingerprint']}")
    return ", ".join(parts)


def tls_action(reason: str) -> str:
    lowered = reason.lower()
    if "expired" in lowered:
        return "renew the vSensor's certificate (or check this host's clock)"
    if "not yet valid" in lowered:
        return "check this host's clock, or wait until the certificate is valid"
    if "hostname" in lowered or "ip address mismatch" in lowered:
        return "use a VSENSOR_HOSTNAME the certificate names, or reissue the certificate"
    return ("give the CA that signed the vSensor's certificate in VSENSOR_CA_FILE, or pin the "
            "certificate with VSENSOR_TLS_FINGERPRINT")


def connect_error(exc: BaseException, target: str, timeout: float) -> tuple[str, str]:
    """(what happened, what to do) for a failed TCP connection."""
    if isinstance(exc, TimeoutError):
        return (f"no answer from {target} within {timeout:g} s",
                "a firewall or network policy drops the packets; allow the sensor to reach the "
                "vSensor's port")
    if isinstance(exc, ConnectionRefusedError):
        return (f"connection refused by {target}: nothing listens there",
                "start the vSensor, or fix VSENSOR_PORT")
    code = exc.errno if isinstance(exc, OSError) else None
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return (f"no route to {target} ({os.strerror(code)})",
                "add a route (default gateway) towards the vSensor, or fix VSENSOR_HOSTNAME")
    strerror = exc.strerror if isinstance(exc, OSError) else None
    return (f"cannot connect to {target}: {strerror or exc}",
            "check the network path to the vSensor")


def getaddrinfo(loop: asyncio.AbstractEventLoop, host: str, port: int) -> asyncio.Future[Any]:
    """``getaddrinfo`` in a daemon thread: a resolver that hangs past our time-out must not hold
    up the exit (the loop's executor would be waited for)."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def resolve() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for the answer any more
            pass

    threading.Thread(target=resolve, name="diagnose getaddrinfo", daemon=True).start()
    return future


def fingerprint_text(raw: bytes) -> str:
    return ":".join(f"{b:02X}" for b in raw)
