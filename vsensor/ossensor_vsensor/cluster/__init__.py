"""Cluster mode: vSensor replicas and store workers sharing state through NATS JetStream.

``ossensor-vsensor --nats URL[,URL...]`` starts a *replica*: it keeps nothing of its own, so any
number run behind one load balancer. ``ossensor-vsensor store --nats URL --data-dir DIR`` starts a
*store worker*, which writes what the replicas took in as the same pcapng files as single mode.
Everything they share lives in JetStream (``docs/cluster.md`` has the picture and the failure
table); the names below are the contract between them and for other consumers of the stream.

Sensor names appear in subjects and keys as :func:`.names.token` (lowercase base32), so that no
name can split a subject or a key.

Chunks: stream ``OSSENSOR_CHUNKS``
    Subjects ``ossensor.chunks.<partition>.<token>``: ``<partition>`` is ``p00`` ...
    (:data:`PARTITIONS` of them, by a stable hash of the sensor name, :func:`partition`); every
    chunk of one sensor goes to one partition, so one store worker holds all of it in order.
    A message is the chunk exactly as the sensor sent it (the encoded, compressed body of
    ``POST /api/v1/chunks``), with headers ``Ossensor-Sensor`` (the name), ``Ossensor-Sequence``
    and ``Nats-Msg-Id: <token>.<sequence>`` (JetStream drops a retry within its window). A body
    over the server's ``max_payload`` goes as ``<n>`` parts (the body cut in order, all but the
    last of one size), each with ``Ossensor-Part: <i>/<n>`` (``i`` from 1) and
    ``Nats-Msg-Id: <token>.<sequence>.<i>``; a replica answers the sensor only once every part is
    stored by JetStream. Parts are published in order, but when some failed the sensor's retry
    adds only those (the others are duplicates), so a reader collects the parts of a chunk by
    ``<token>.<sequence>`` and ``<i>``, not by position in the stream. A replica checks a chunk's
    head (sensor, sequence, instance) against the signed request, never its records: whoever
    decodes a body checks it (``ChunkCodec.decode``) and must expect a malformed one.
    Retention is by interest: a message leaves the stream once every durable consumer has
    acknowledged it; the store's consumers (``store-<partition>``) are made with the stream, so
    no chunk is published before they exist.
    The stream refuses new messages when full (``discard: new``): replicas answer ``507`` with
    ``Retry-After``, never drop what is stored.

Key-value buckets (all with the stream's replica count)
    ``ossensor-sensors``: ``<token>`` -> the registration of that sensor (JSON), for peer ranges,
    ``name_in_use`` and the status pages of every replica.
    ``ossensor-nonces``: ``<sha256 of the nonce>``, created once; its age limit is the replay
    window, so a request replayed to any replica within it finds the key.
    ``ossensor-actions``: ``<action id>`` -> an Antigena action in force (JSON); every replica
    watches the bucket and pushes changes to the sensors connected to it.
    ``ossensor-reports``: ``<token>.<seq>``, created once per Antigena report ``seq``.
    ``ossensor-store``: ``partition.<partition>`` -> the store worker that holds it (a lease
    renewed every few seconds); ``worker.<name>`` -> that worker's lag and counters.
    ``ossensor-replicas``: ``<replica>`` -> that replica's address and counters, for the status.
"""

from __future__ import annotations

import hashlib

#: Fixed when the stream is made: the most store workers that can share the work.
PARTITIONS = 32
STREAM = "OSSENSOR_CHUNKS"
SUBJECT_PREFIX = "ossensor.chunks"
#: The headers of a chunk message (see above).
H_SENSOR = "Ossensor-Sensor"
H_SEQUENCE = "Ossensor-Sequence"
H_PART = "Ossensor-Part"
H_MSG_ID = "Nats-Msg-Id"


def partition(sensor: str, partitions: int = PARTITIONS) -> str:
    """The partition of ``sensor``'s chunks (``p00``...): the same on every replica and run."""
    digest = hashlib.sha256(sensor.encode()).digest()
    return f"p{int.from_bytes(digest[:4], 'big') % partitions:02d}"
