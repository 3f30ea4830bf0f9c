"""What a vSensor is told at start: parsed once (by the CLI or a test), frozen, never a key shown."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ossensor_core.wire.names import DEFAULT_SKEW_SECONDS, MAX_CHUNK_BYTES

from .cluster.connection import ClusterSettings

CLIENT_MAX_SIZE = MAX_CHUNK_BYTES  # larger bodies get 413 before they are read

#: Sized so that 5,000 sensors with three connections each (chunks, heartbeats, Antigena's
#: websocket) are admitted with room to spare; ``docs/security.md`` explains each bound.
MAX_CONNECTIONS = 16_384
MAX_CONNECTIONS_PER_ADDRESS = 64


@dataclass(frozen=True)
class VSensorSettings:
    """Everything the application needs; parsed once (by the CLI or a test)."""

    data_dir: Path
    keys: Sequence[str]
    admin_token: str | None = None
    skew_seconds: float = float(DEFAULT_SKEW_SECONDS)
    rotate_bytes: int = 100 << 20
    rotate_seconds: float = 300.0
    heartbeat_seconds: float = 10.0
    #: Ports sensors connect to (behind NAT or a load balancer these differ from the port this
    #: process listens on, which is excluded as well).
    vsensor_ports: Sequence[int] = (443,)
    #: Added to time.time(): lets tests shift the vSensor's clock.
    clock_offset: float = 0.0
    client_max_size: int = CLIENT_MAX_SIZE
    #: Delete completed files older than this (None: keep them).
    retain_seconds: float | None = None
    #: Keep the completed files of all sensors together under this size, oldest deleted first
    #: (None: no limit).
    retain_bytes: int | None = None
    #: How often retention runs (it also runs after every completed file).
    retention_interval: float = 10.0
    #: ``(host, port)`` that sensors should use once registered, when they register through a
    #: load balancer in front of several vSensors (None: keep the address they used).
    direct: tuple[str, int] | None = None
    #: Connection bounds (``server.py``): a TLS handshake, a request's headers (from its first
    #: byte), its body (``auth.py``), and the quiet time between requests on a connection.
    handshake_seconds: float = 10.0
    header_seconds: float = 10.0
    body_seconds: float = 60.0
    idle_seconds: float = 60.0
    #: Caps applied at accept, before TLS, and on requests in flight (503 ``busy`` beyond).
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    max_requests: int = MAX_CONNECTIONS
    max_requests_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    #: Declared body bytes being read or handled at once, over all requests (503 ``busy``
    #: beyond): what key holders can make the vSensor hold in memory.
    max_body_bytes_in_flight: int = 8 * CLIENT_MAX_SIZE
    #: Networks (CIDR) a sensor may claim beyond the default private, shared and unique-local
    #: ones (``claims.py``), and the widest claim per IP version, as a prefix length.
    claims_allow: Sequence[str] = ()
    claims_max_prefix_v4: int = 16
    claims_max_prefix_v6: int = 48
    #: Networks (CIDR) of TCP load balancers whose connections start with a PROXY header
    #: (``proxy_protocol.py``): the client address is taken from it.
    proxy_protocol_from: Sequence[str] = ()
    #: Cluster mode (``--nats``): a replica sharing its state through NATS JetStream
    #: (``cluster/``); None: single mode, everything in this process and ``data_dir``.
    cluster: ClusterSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "vsensor_ports", tuple(int(p) for p in self.vsensor_ports))
        object.__setattr__(self, "claims_allow", tuple(self.claims_allow))
        object.__setattr__(self, "proxy_protocol_from", tuple(self.proxy_protocol_from))
        if not 0 <= self.claims_max_prefix_v4 <= 32 or not 0 <= self.claims_max_prefix_v6 <= 128:
            raise ValueError("VSensorSettings.claims_max_prefix_v4/v6 must be 0-32 and 0-128")
        if not self.keys or not all(self.keys):
            raise ValueError("VSensorSettings needs at least one non-empty HMAC key")
        for name, value in (("retain_seconds", self.retain_seconds),
                            ("retain_bytes", self.retain_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"VSensorSettings.{name} must be positive, not {value}")
        if self.retention_interval <= 0:
            raise ValueError("VSensorSettings.retention_interval must be positive")
        bounds = {"handshake_seconds": self.handshake_seconds,
                  "header_seconds": self.header_seconds, "body_seconds": self.body_seconds,
                  "idle_seconds": self.idle_seconds, "max_connections": self.max_connections,
                  "max_connections_per_address": self.max_connections_per_address,
                  "max_requests": self.max_requests,
                  "max_requests_per_address": self.max_requests_per_address,
                  "max_body_bytes_in_flight": self.max_body_bytes_in_flight}
        for name, value in bounds.items():
            if not value > 0:
                raise ValueError(f"VSensorSettings.{name} must be positive, not {value}")

    def now(self) -> float:
        """The vSensor's clock (Unix time, shifted by ``clock_offset``): every timestamp it
        checks, answers or shows comes from here."""
        return time.time() + self.clock_offset

    def __repr__(self) -> str:  # never show keys or the admin token
        return (f"VSensorSettings(data_dir={str(self.data_dir)!r}, keys=<{len(self.keys)}>, "
                f"admin_token={'<set>' if self.admin_token else None}, "
                f"skew_seconds={self.skew_seconds}, rotate_bytes={self.rotate_bytes}, "
                f"rotate_seconds={self.rotate_seconds}, vsensor_ports={self.vsensor_ports}, "
                f"retain_seconds={self.retain_seconds}, retain_bytes={self.retain_bytes})")
