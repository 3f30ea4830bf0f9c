"""Building a vSensor request: its address and its signed headers (``docs/protocol.md``)."""

from __future__ import annotations

from ossensor_core.wire.names import H_INSTANCE, H_VERSION, PROTOCOL_VERSIONS, SHA256
from ossensor_core.wire.signing import sign


def base_url(host: str, port: int) -> str:
    """``https://host:port``, with an IPv6 address in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}"


def signed_headers(key: str, sensor: str, method: str, path: str, body: bytes, *,
                   version: int | None = None, instance: str | None = None,
                   digest: str | None = None, algorithm: str = SHA256) -> dict[str, str]:
    """The protocol version, the instance id (when given) and a fresh signature (new nonce and
    timestamp) for one request; ``digest`` is the body's, when already computed."""
    headers = {H_VERSION: str(version or max(PROTOCOL_VERSIONS))}
    if instance is not None:
        headers[H_INSTANCE] = instance
    headers.update(sign(key, method, path, body, sensor, digest=digest, algorithm=algorithm))
    return headers
