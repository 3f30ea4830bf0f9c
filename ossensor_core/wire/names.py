"""Every name and constant that crosses the wire, in one place.

Both ends import these: the sensor (transport, Antigena, diagnose), the reference vSensor and
the tests. ``docs/protocol.md`` describes what each means; a new header, path or reason code is
added here first.
"""

from __future__ import annotations

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
    """The reason codes that a 400, 401 or 409 carries in its ``error`` field and that label the
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


#: Every reason code, in the order ``docs/protocol.md`` lists them.
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
