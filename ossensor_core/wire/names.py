"""Every name and constant that crosses the wire, in one place.

Both ends import these: the sensor (transport, Antigena, diagnose), the reference vSensor and
the tests. ``docs/protocol.md`` describes what each means; a new header, path or reason code is
added here first.
"""

from __future__ import annotations

import re

# -- the vSensor protocol -------------------------------------------------------------------

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
SCHEME = "OSSENSOR-HMAC-SHA256"  # the Authorization header's scheme

H_SENSOR = "X-Ossensor-Sensor"
H_TIMESTAMP = "X-Ossensor-Timestamp"
H_NONCE = "X-Ossensor-Nonce"
H_CONTENT = "X-Ossensor-Content-SHA256"
H_CONTENT_BLAKE3 = "X-Ossensor-Content-BLAKE3"
H_VERSION = "X-Ossensor-Protocol"
H_INSTANCE = "X-Ossensor-Instance"  # the sending process (random, kept in the spool)
H_CHUNK_SEQUENCE = "X-Ossensor-Chunk-Sequence"
#: ``X-Ossensor-Test: 1`` on a chunk: verify and decode it, answer, store nothing.
H_TEST = "X-Ossensor-Test"
#: On every 401: the vSensor's clock, so that a sensor can tell skew from a wrong key.
H_SERVER_TIME = "X-Ossensor-Server-Time"
AUTHORIZATION = "Authorization"

PATH_REGISTER = "/api/v1/register"
PATH_CHUNKS = "/api/v1/chunks"
PATH_HEARTBEAT = "/api/v1/heartbeat"
PATH_ANTIGENA = "/api/v1/antigena/ws"
PATH_ACTIONS = "/api/v1/antigena/actions"  # the operator's API (admin token)

DEFAULT_SKEW_SECONDS = 300

#: Body digests a signature can cover, best first (``DIGESTS``).
SHA256 = "sha256"
BLAKE3 = "blake3"

#: The media type of a chunk body (``ossensor-chunk``, every version).
CHUNK_MEDIA_TYPE = "application/vnd.ossensor.chunk.v1"


class Reason:
    """The reason codes that a 4xx or 503 carries in its ``error`` field and that label the
    vSensor's metrics. They tell an operator what to fix (clock, key, a proxy that rewrites
    bodies) without helping anyone guess a key."""

    MISSING_HEADER = "missing_header"  # also a malformed sensor name or nonce
    BAD_SCHEME = "bad_scheme"
    BAD_TIMESTAMP = "bad_timestamp"
    CLOCK_SKEW = "clock_skew"
    BAD_BODY_HASH = "bad_body_hash"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    UNKNOWN_SENSOR = "unknown_sensor"
    NAME_IN_USE = "name_in_use"
    #: A chunk that fails a check of ``ossensor_core.wire.chunk`` (400, nothing stored).
    BAD_CHUNK = "bad_chunk"
    #: 400: the sensor name breaks :data:`SENSOR_NAME_RULE` (checked on every request).
    BAD_SENSOR_NAME = "bad_sensor_name"
    #: 400: a header or token holds bytes that are not printable ASCII.
    BAD_HEADER = "bad_header"
    #: 400: a JSON body is not valid JSON (``Infinity`` and ``NaN`` included) or not an object.
    BAD_JSON = "bad_json"
    #: 411: a signed request without ``Content-Length`` (chunked bodies are refused).
    LENGTH_REQUIRED = "length_required"
    #: 413: the declared ``Content-Length`` is over the vSensor's limit.
    BODY_TOO_LARGE = "body_too_large"
    #: 408: the body did not arrive within the body deadline.
    BODY_TIMEOUT = "body_timeout"
    #: 503 with ``Retry-After``: too many requests or body bytes in flight; retry later.
    BUSY = "busy"
    #: 400: an Antigena action that the operator API refuses (a bad address, port or time).
    BAD_ACTION = "bad_action"
    #: 400: an Antigena action that would block the sensors' own connections to the vSensor.
    CUTS_VSENSOR = "cuts_vsensor"
    #: 409: a sensor already has the most Antigena actions in force that its filter holds.
    TOO_MANY_ACTIONS = "too_many_actions"
    #: 503 with ``Retry-After``: the vSensor could not write its file of Antigena actions in
    #: force, so the operator's change was not made (it would not survive a restart).
    ACTIONS_NOT_SAVED = "actions_not_saved"


#: The authentication reason codes (401 and 409), in the order ``docs/protocol.md`` lists them.
REASON_CODES: tuple[str, ...] = (
    Reason.MISSING_HEADER, Reason.BAD_SCHEME, Reason.BAD_TIMESTAMP, Reason.CLOCK_SKEW,
    Reason.BAD_BODY_HASH, Reason.BAD_SIGNATURE, Reason.REPLAY, Reason.UNKNOWN_SENSOR,
    Reason.NAME_IN_USE, Reason.BAD_CHUNK)

# -- chunk bounds (what a decoder takes; the encoder stays inside them) ----------------------

#: The largest chunk body, decompressed: decompression stops here whatever the frame declares.
#: The vSensor's request limit (413) is the same 64 MiB; a sensor's chunk is
#: ``OSSENSOR_CHUNK_BYTES`` (4 MiB by default) plus one ring block.
MAX_CHUNK_BYTES = 64 << 20
#: Distinct link types in one chunk. A receiver keeps one open file per link type; a host has a
#: handful (Ethernet, raw IP for tunnels, cooked SLL, IPv4/IPv6), so 16 is never reached by a
#: sensor and bounds what one chunk can make a vSensor open.
MAX_CHUNK_LINKTYPES = 16
#: Batches in one chunk. A batch is a ring block (or a filtered part of one) holding at least one
#: record of 64 bytes or more, so a 4 MiB chunk has at most 65,536; each costs a Python object.
MAX_CHUNK_BATCHES = 65536
#: Rows of a v2 chunk's interface table (one per captured interface; a node with thousands of
#: pods has thousands of veths).
MAX_CHUNK_INTERFACES = 16384
#: The largest zstd window a chunk may need (a receiver allocates it): zstd levels up to 19 use
#: at most this; the encoder caps higher levels to it.
MAX_ZSTD_WINDOW = 8 << 20

# -- bounds on the vSensor's answers (what a sensor takes; the vSensor stays inside them) ------

#: The largest answer body a sensor reads (registration, heartbeat, chunk acknowledgement).
MAX_ANSWER_BYTES = 8 << 20
#: ``heartbeat_seconds`` is used within these (a hostile 0 or 1e-9 is no tight loop, infinity
#: no silence); a value that is not a finite number is ignored.
HEARTBEAT_SECONDS_MIN = 0.1
HEARTBEAT_SECONDS_MAX = 3600.0
#: ``peer_ranges``: at most this many ranges of at most this many characters each
#: (``first-last`` of two full IPv6 addresses is 79), an ``id`` of at most this many.
MAX_PEER_RANGES = 65536
MAX_PEER_RANGE_CHARS = 100
MAX_PEER_RANGES_ID_CHARS = 64
#: The vSensor's filter expression (its libpcap form for older sensors stays far below).
MAX_FILTER_CHARS = 256 << 10

#: The reason codes of malformed or unwelcome requests (400, 408, 411, 413, 503), checked
#: from the headers before a body is read where they can be; same order as the docs.
INPUT_REASON_CODES: tuple[str, ...] = (
    Reason.BAD_SENSOR_NAME, Reason.BAD_HEADER, Reason.BAD_JSON, Reason.LENGTH_REQUIRED,
    Reason.BODY_TOO_LARGE, Reason.BODY_TIMEOUT, Reason.BUSY)

#: A sensor name, at both ends: 1-253 characters from ``A-Za-z0-9._-``, not starting with a
#: dot (every Kubernetes node name fits). The vSensor's folder for a sensor is its name.
SENSOR_NAME_RULE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,252}")
SENSOR_NAME_HELP = "1-253 characters from A-Za-z0-9._-, not starting with a dot"


def valid_sensor_name(name: str) -> bool:
    """Whether ``name`` follows :data:`SENSOR_NAME_RULE`."""
    return SENSOR_NAME_RULE.fullmatch(name) is not None

# -- captured packets -----------------------------------------------------------------------

#: The largest frame kept (libpcap's and tcpdump's default snap length).
SNAPLEN = 262144
#: The largest wire length a record may state (GSO frames exceed the MTU by far): room is left
#: for the 802.1Q tag that is put back when the packet is written.
MAX_WIRE_LENGTH = 0xFFFFFFFF - 4

# Link types (LINKTYPE_* in pcap/pcapng files, DLT_* in libpcap).
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # bare IPv4/IPv6 packets: tun, ipip, WireGuard
LINKTYPE_LINUX_SLL = 113
