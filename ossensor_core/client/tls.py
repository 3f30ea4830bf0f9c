"""How the sensor trusts the vSensor: a CA file, a pinned certificate fingerprint, or nothing.

The settings (``VSENSOR_CA_FILE``, ``VSENSOR_TLS_FINGERPRINT``, ``VSENSOR_TLS_VERIFY``) belong to
the core, not to a transport: the https transport, Antigena's websocket and ``ossensor
diagnose`` all talk to the same vSensor and read them from the frozen configuration, whichever
transport is loaded.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiohttp

from ossensor_core.errors import TransportError
# The settings are the core's (read at start-up whatever is loaded); this module uses them.
from ossensor_core.pipeline.config import (ENV_CA_FILE, ENV_FINGERPRINT, ENV_TLS_VERIFY,
                                          SETTINGS_GROUP, SensorConfig, connection_settings,
                                          normalise_fingerprint)

#: What ``aiohttp`` takes as its ``ssl`` argument.
AiohttpTls = ssl.SSLContext | aiohttp.Fingerprint | bool


def tls_setting(ca_file: str, fingerprint: str, tls_verify: bool) -> AiohttpTls:
    """How a client checks the vSensor's certificate (aiohttp's ``ssl`` argument): the
    pinned fingerprint, else no verification (False), else a TLS 1.2+ context trusting
    ``ca_file`` or the system CAs. Raises TransportError when the CA file cannot be read."""
    if fingerprint:  # a pin is explicit: it is checked even with VSENSOR_TLS_VERIFY off
        return aiohttp.Fingerprint(bytes.fromhex(normalise_fingerprint(fingerprint)))
    if not tls_verify:
        return False
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"{ENV_CA_FILE}: cannot read the CA file {ca_file!r}: {exc}") \
            from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def client_context(ca_file: str, fingerprint: str, verify: bool) -> ssl.SSLContext:
    """A TLS context for a blocking client (``http.client``): with a pin, or without
    verification, it verifies nothing and the caller checks the pin after the handshake."""
    if fingerprint or not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class VSensorTls:
    """The vSensor TLS settings as configured (the fingerprint as given)."""

    ca_file: str = ""
    fingerprint: str = ""
    verify: bool = True

    @classmethod
    def from_config(cls, config: SensorConfig) -> VSensorTls:
        settings = config.plugin(SETTINGS_GROUP)
        return cls(settings.get("ca_file", ""), settings.get("fingerprint", ""),
                   settings.get("tls_verify", True))

    @property
    def pin(self) -> str:
        """The fingerprint normalised ("" when none); raises ValueError when malformed."""
        return normalise_fingerprint(self.fingerprint) if self.fingerprint else ""

    def for_aiohttp(self) -> AiohttpTls:
        """See :func:`tls_setting`."""
        return tls_setting(self.ca_file, self.fingerprint, self.verify)

    def for_blocking_client(self) -> ssl.SSLContext:
        """See :func:`client_context`."""
        return client_context(self.ca_file, self.pin, self.verify)
