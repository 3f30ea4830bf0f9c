"""Sensor names as NATS subject tokens and key-value keys, one to one.

A sensor name is any UTF-8 text the protocol allows (dots, spaces, ``*`` and ``>`` included),
and NATS gives those characters meaning in subjects and keys. :func:`token` writes the name's
UTF-8 bytes in lowercase base32 without padding (``a-z`` and ``2-7`` only), behind an ``s``
so that no token is empty; :func:`name` reads it back. Two names never share a token.
"""

from __future__ import annotations

import base64
import binascii


def token(sensor: str) -> str:
    """``sensor`` as one subject token / key component."""
    return "s" + base64.b32encode(sensor.encode()).decode("ascii").rstrip("=").lower()


def name(text: str) -> str:
    """The sensor name of a :func:`token`; ValueError for anything else."""
    if not text.startswith("s") or not text[1:].isalnum() or not text.isascii():
        raise ValueError(f"not a sensor token: {text[:80]!r}")
    body = text[1:].upper()
    try:
        sensor = base64.b32decode(body + "=" * (-len(body) % 8)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a sensor token: {text[:80]!r}") from exc
    if not sensor or token(sensor) != text:  # one spelling per name (no stray trailing bits)
        raise ValueError(f"not a sensor token: {text[:80]!r}")
    return sensor
