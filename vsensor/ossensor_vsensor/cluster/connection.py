"""The connection of a replica or a store worker to NATS, and the stream and buckets they share.

:meth:`Cluster.connect` connects to any of the servers (reconnecting for ever after that) and
makes sure the stream, the store's consumers and the buckets of the package docstring exist, with
:attr:`ClusterSettings.replicas` copies each; it waits for a JetStream quorum to do so, so a
replica started before its NATS servers simply waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from . import PARTITIONS, STREAM, SUBJECT_PREFIX

log = logging.getLogger("ossensor_vsensor.cluster")

#: The buckets and their age limits (None: entries stay until deleted); see the package
#: docstring. ``ossensor-nonces`` takes the replay window from the settings.
BUCKETS: dict[str, float | None] = {
    "ossensor-sensors": None,
    "ossensor-nonces": None,  # set from the skew window at connect
    "ossensor-actions": None,
    "ossensor-reports": 7 * 86400.0,
    "ossensor-store": None,
    "ossensor-replicas": None,
}


@dataclass(frozen=True)
class ClusterSettings:
    """``--nats`` and the options that go with it."""

    urls: tuple[str, ...]
    #: Copies JetStream keeps of the stream and of every bucket (1 for a single NATS server).
    replicas: int = 3
    #: This process's name in the cluster (a replica's or a store worker's): the pod name in
    #: Kubernetes, the host name elsewhere. Unique among the processes of one kind.
    name: str = field(default_factory=socket.gethostname)
    #: The stream's size limit: beyond it replicas answer 507 until store workers catch up.
    stream_max_bytes: int = 4 << 30
    #: How long a publish waits for JetStream's acknowledgement before the replica answers 503.
    publish_timeout: float = 10.0

    def __post_init__(self) -> None:
        urls = tuple(u.strip() for u in self.urls if u.strip())
        if not urls:
            raise ValueError("--nats needs at least one server URL")
        for url in urls:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"--nats {url[:100]!r}: not a nats:// or tls:// URL")
        object.__setattr__(self, "urls", urls)
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"--nats-replicas {self.replicas}: JetStream keeps 1 to 5 copies")
        if not self.name or len(self.name) > 128:
            raise ValueError("the cluster name of this process (--replica) must be 1-128 "
                             "characters")


def subjects() -> list[str]:
    return [f"{SUBJECT_PREFIX}.>"]


class Cluster:
    """One process's NATS connection, JetStream context and buckets."""

    def __init__(self, settings: ClusterSettings, nc: Any, js: Any) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.buckets: dict[str, Any] = {}
        self.manages_stream = True

    @property
    def name(self) -> str:
        return self.settings.name

    @classmethod
    async def connect(cls, settings: ClusterSettings, replay_window: float = 600.0,
                      attempt_timeout: float = 5.0, manages_stream: bool = True) -> Cluster:
        """Connect, then make the stream, the consumers and the buckets (waiting for a quorum,
        logging every 10 s while it waits). ``manages_stream``: a replica sets an existing
        stream's limits to its own options (``--nats-stream-max-bytes``, ``--nats-replicas``);
        a store worker makes the stream only when it is missing and leaves it as it is."""
        import nats  # cluster mode only: nats-py is the [cluster] extra

        async def disconnected() -> None:
            log.warning("NATS: disconnected; reconnecting")

        async def reconnected() -> None:
            log.info("NATS: reconnected to %s", nc.connected_url.netloc if nc.connected_url
                     else "?")

        async def error(exc: Exception) -> None:
            log.warning("NATS: %s", exc)

        nc = await nats.connect(servers=list(settings.urls), name=settings.name,
                                allow_reconnect=True, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, connect_timeout=attempt_timeout,
                                disconnected_cb=disconnected, reconnected_cb=reconnected,
                                error_cb=error)
        cluster = cls(settings, nc, nc.jetstream(timeout=attempt_timeout))
        cluster.manages_stream = manages_stream
        waited = 0.0
        while True:
            try:
                await cluster._ensure(replay_window)
                break
            except Exception as exc:  # no quorum yet, a leader election: wait for it
                if waited % 10 < 1:
                    log.warning("NATS: cannot set up the stream and buckets yet (%s); "
                                "waiting for a JetStream quorum", exc or type(exc).__name__)
                await asyncio.sleep(1.0)
                waited += 1.0
        log.info("NATS: connected to %s as %r (%d copies of the stream and buckets)",
                 nc.connected_url.netloc if nc.connected_url else "?", settings.name,
                 settings.replicas)
        return cluster

    async def _ensure(self, replay_window: float) -> None:
        from nats.js.api import (AckPolicy, ConsumerConfig, DiscardPolicy, KeyValueConfig,
                                 RetentionPolicy, StorageType, StreamConfig)
        from nats.js.errors import BadRequestError, NotFoundError

        config = StreamConfig(name=STREAM, subjects=subjects(),
                              retention=RetentionPolicy.INTEREST, discard=DiscardPolicy.NEW,
                              max_bytes=self.settings.stream_max_bytes,
                              storage=StorageType.FILE, num_replicas=self.settings.replicas,
                              duplicate_window=120.0)
        try:
            await self.js.stream_info(STREAM)
            if self.manages_stream:
                await self.js.update_stream(config)
        except NotFoundError:
            await self.js.add_stream(config)
        async def consumer(part: str) -> None:
            try:
                await self.js.add_consumer(STREAM, ConsumerConfig(
                    durable_name=f"store-{part}", filter_subject=f"{SUBJECT_PREFIX}.{part}.>",
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0, max_ack_pending=1024,
                    num_replicas=self.settings.replicas))
            except BadRequestError as exc:  # exists with other settings (an older version)
                log.warning("NATS: consumer store-%s: %s", part, exc)

        # At once: each is a consensus group of its own, half a second to make one by one.
        await asyncio.gather(*(consumer(f"p{i:02d}") for i in range(PARTITIONS)))
        ages = {**BUCKETS, "ossensor-nonces": replay_window}

        async def bucket(name: str, age: float | None) -> None:
            try:
                self.buckets[name] = await self.js.key_value(name)
            except Exception:  # BucketNotFoundError (its class moved between nats-py versions)
                self.buckets[name] = await self.js.create_key_value(KeyValueConfig(
                    bucket=name, history=1, ttl=age, replicas=self.settings.replicas,
                    storage=StorageType.FILE))

        await asyncio.gather(*(bucket(name, age) for name, age in ages.items()))

    def kv(self, bucket: str) -> Any:
        """One of :data:`BUCKETS` (a nats-py ``KeyValue``)."""
        return self.buckets[bucket]

    async def close(self) -> None:
        try:
            await self.nc.drain()
        except Exception as exc:  # already closed, or the servers are gone
            log.info("NATS: closing: %s", exc or type(exc).__name__)
