"""The exception hierarchy of ossensor.

Adapters (sockets, netlink, libpcap, scapy, HTTP) map their low-level errors onto these classes at
their boundary with ``raise ... from exc``, so that callers handle one family and the cause is kept.

    OssensorError
    ├── ConfigError        invalid configuration; carries every problem found, not just the first
    ├── PluginError        a named plugin is unknown, ambiguous or fails to load
    ├── FilterError        a BPF filter does not compile or does not fit in the kernel
    ├── InterfaceError     interface discovery or a netlink watch failed
    ├── CaptureError       a capture source could not be opened or read
    ├── TransportError     a transport could not store or send a chunk
    └── StorageError       pcapng files could not be written or completed; carries the errno
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class OssensorError(Exception):
    """Base class of every error that ossensor raises on purpose."""


class ConfigError(OssensorError):
    """The configuration is invalid. ``problems`` lists every problem, each naming its variable."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


class PluginError(OssensorError):
    """A plugin named in the configuration is unknown, ambiguous, or failed to import."""


class FilterError(OssensorError):
    """A BPF filter expression does not compile, or is too long for the kernel."""


class InterfaceError(OssensorError):
    """Interfaces could not be listed or watched."""


class CaptureError(OssensorError):
    """A capture source could not be opened, configured or read."""


class TransportError(OssensorError):
    """A transport could not accept, store or send a chunk."""


class StorageError(OssensorError):
    """Pcapng files could not be written or completed (see :mod:`ossensor_core.wire.rotating_pcapng`).

    ``errno`` and ``reason`` (its strerror) are the OSError's, ``path`` the file concerned (None
    when no file was involved yet); the OSError is the ``__cause__``.
    """

    def __init__(self, message: str, errno: int | None = None, reason: str = "",
                 path: Path | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.reason = reason or message
        self.path = path
