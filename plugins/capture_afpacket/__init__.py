"""The ``afpacket`` capture backend: a Linux ``AF_PACKET`` socket with a ``TPACKET_V3`` ring.

The kernel fills ring blocks with records laid out exactly like :class:`PacketBatch` data (each
a ``struct tpacket3_hdr`` followed by the frame), so a retired block becomes a batch with one
slice copy and no per-packet work in Python. The socket is opened with protocol 0 and bound only
after the filter and the ring are in place, so no packet is ever seen unfiltered.

Settings (``OSSENSOR_AFPACKET_*``): ``BLOCK_SIZE``, ``BLOCK_COUNT`` and ``BLOCK_TIMEOUT_MS`` size
the ring and bound the latency at low rates (a block is handed over when full or when the timeout
expires).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import platform
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.capture.bpf import BpfProgram, attach_filter
from ossensor_core.errors import CaptureError, ConfigError, FilterError
from ossensor_core.node.interfaces import Interface
from ossensor_core.capture.headers import ETH_P_ALL
from ossensor_core.plugin import CaptureStats, SensorConfig, Setting, SettingsGroup, hookimpl

log = logging.getLogger(__name__)

PLUGIN = "afpacket"

# <linux/if_packet.h> and <linux/if_ether.h>
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
PACKET_MR_PROMISC = 1
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0

# struct tpacket_req3 { u32 tp_block_size, tp_block_nr, tp_frame_size, tp_frame_nr,
#                       tp_retire_blk_tov, tp_sizeof_priv, tp_feature_req_word; }
TPACKET_REQ3 = struct.Struct("=7I")
# struct packet_mreq { int mr_ifindex; u16 mr_type; u16 mr_alen; u8 mr_address[8]; }
PACKET_MREQ = struct.Struct("=iHH8s")
# struct tpacket_stats_v3 { u32 tp_packets, tp_drops, tp_freeze_q_cnt; }
TPACKET_STATS_V3 = struct.Struct("=3I")

# struct tpacket_block_desc { u32 version; u32 offset_to_priv; struct tpacket_hdr_v1 {
#     u32 block_status; u32 num_pkts; u32 offset_to_first_pkt; u32 blk_len; u64 seq_num;
#     struct tpacket_bd_ts ts_first_pkt, ts_last_pkt; } }
# Read as 32-bit words from the start of the block: the indexes below. ``blk_len`` counts from the
# start of the block (the kernel starts it at the size of the descriptor), so the used packet area
# is block[offset_to_first_pkt:blk_len].
_BLOCK_STATUS = 2
_NUM_PKTS = 3
_OFFSET_TO_FIRST_PKT = 4
_BLK_LEN = 5
_BLOCK_DESC_SIZE = 48  # BLK_PLUS_PRIV(0): the descriptor, aligned to 8

# tp_frame_size means nothing to a V3 ring, but the kernel checks it: at least the record header,
# a multiple of TPACKET_ALIGNMENT (16), and it must divide the block size.
FRAME_SIZE = 2048
# Room a block needs for one 64 KiB frame: the largest IPv4/IPv6 packet of a TSO/GRO frame, its
# Ethernet header and a VLAN tag, the record header with its sockaddr_ll padded to the MAC offset
# (TPACKET_ALIGN(68 + 16) = 96), and the block descriptor.
LARGEST_FRAME = 65535 + 14 + 4
RECORD_OVERHEAD = 96
DEFAULT_BLOCK_SIZE = 1 << 20


def min_block_size(page_size: int = mmap.PAGESIZE) -> int:
    """The smallest block that holds a 64 KiB frame whole, rounded up to a page."""
    need = _BLOCK_DESC_SIZE + RECORD_OVERHEAD + LARGEST_FRAME
    return -(-need // page_size) * page_size


def ring_problems(block_size: int, block_count: int, block_timeout_ms: int,
                  page_size: int = mmap.PAGESIZE) -> list[str]:
    """Every reason the kernel would refuse this ring, or would cut large frames, each naming
    its variable."""
    problems = []
    if block_size % page_size:
        problems.append(f"OSSENSOR_AFPACKET_BLOCK_SIZE={block_size} must be a multiple of the "
                        f"page size ({page_size} bytes)")
    minimum = min_block_size(page_size)
    if block_size < minimum:
        problems.append(f"OSSENSOR_AFPACKET_BLOCK_SIZE={block_size} is too small: a block must "
                        f"hold a 64 KiB frame with its headers (at least {minimum} bytes; the "
                        f"default is {DEFAULT_BLOCK_SIZE})")
    if block_count < 2:
        problems.append(f"OSSENSOR_AFPACKET_BLOCK_COUNT={block_count} must be at least 2")
    elif block_size * block_count > 0xFFFFFFFF:
        problems.append(f"OSSENSOR_AFPACKET_BLOCK_SIZE x OSSENSOR_AFPACKET_BLOCK_COUNT "
                        f"({block_size} x {block_count}) must stay under 4 GiB per interface")
    if block_timeout_ms < 1:
        problems.append(f"OSSENSOR_AFPACKET_BLOCK_TIMEOUT_MS={block_timeout_ms} must be at least 1")
    return problems


def _memory_fence() -> Callable[[int], None] | None:
    """A C11 ``atomic_thread_fence`` for CPUs that reorder loads (ARM, POWER), else None.

    The kernel fills a block, then sets TP_STATUS_USER (after ``smp_wmb``); we must not read the
    block's fields before that status, and must finish copying before handing the block back.
    x86 never reorders loads with older loads, nor stores with older loads, so it needs nothing.
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i486", "i586", "i686"):
        return None
    for name in (ctypes.util.find_library("atomic"), "libatomic.so.1"):
        if not name:
            continue
        try:
            fence = ctypes.CDLL(name).atomic_thread_fence
        except (OSError, AttributeError):
            continue
        fence.argtypes = [ctypes.c_int]
        fence.restype = None
        return fence
    log.warning("libatomic not found: ring reads on %s run without memory barriers",
                platform.machine())
    return None


_FENCE = _memory_fence()

_ACQUIRE = 2  # __ATOMIC_ACQUIRE
_RELEASE = 3  # __ATOMIC_RELEASE


def _capture_error(interface: str, step: str, exc: OSError) -> CaptureError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return CaptureError(f"afpacket capture on {interface}: {step} failed: {exc.strerror} "
                            f"(needs CAP_NET_RAW)")
    if exc.errno in (errno.ENODEV, errno.ENXIO):
        return CaptureError(f"afpacket capture on {interface}: {step} failed: no such interface")
    return CaptureError(f"afpacket capture on {interface}: {step} failed: "
                        f"{exc.strerror or exc}")


class AfPacketSource:
    """One open TPACKET_V3 capture; see :class:`ossensor_core.pipeline.contracts.CaptureSource`."""

    def __init__(self, interface: Interface, program: BpfProgram, block_size: int,
                 block_count: int, block_timeout_ms: int) -> None:
        if interface.linktype is None:
            raise CaptureError(f"afpacket capture on {interface.name}: link type ARPHRD "
                               f"{interface.arphrd} cannot be captured")
        self.interface = interface
        self.linktype: int = interface.linktype
        self.block_size = block_size
        self.block_count = block_count
        # The kernel hands over a partly filled block when its timeout expires: a packet
        # captured now is readable within this time (the core waits this long before the
        # final read at shutdown).
        self.flush_seconds = 2 * block_timeout_ms / 1000
        self._block = 0
        self._packets = 0
        self._drops = 0
        self.freezes = 0  # times every block was full (tp_freeze_q_cnt), for diagnosis
        self._sock: socket.socket | None = None
        self._ring: mmap.mmap | None = None
        self._words: memoryview | None = None
        name = interface.name
        step = "socket(AF_PACKET)"
        try:
            # Protocol 0: nothing is queued until bind() names ETH_P_ALL, after the filter.
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                attach_filter(self._sock.fileno(), program)
            except FilterError as exc:
                raise CaptureError(f"afpacket capture on {name}: {exc}") from exc
            step = "PACKET_VERSION"
            self._sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            step = "PACKET_RX_RING"
            frames = block_size // FRAME_SIZE * block_count
            self._sock.setsockopt(SOL_PACKET, PACKET_RX_RING, TPACKET_REQ3.pack(
                block_size, block_count, FRAME_SIZE, frames, block_timeout_ms, 0, 0))
            step = "mmap of the ring"
            self._ring = mmap.mmap(self._sock.fileno(), block_size * block_count,
                                   mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Aligned 32-bit loads and stores of the block descriptors, in place.
            self._words = memoryview(self._ring).cast("I")
            step = "bind"
            self._sock.bind((name, ETH_P_ALL))
            # bind() takes a name; make sure it still names the interface we were given (veths
            # come and go, and an index labels every batch).
            index = socket.if_nametoindex(name)
            if index != interface.index:
                raise CaptureError(f"afpacket capture on {name}: the interface was re-created "
                                   f"(index {index}, expected {interface.index})")
            step = "PACKET_ADD_MEMBERSHIP (promiscuous mode)"
            self._sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MREQ.pack(
                interface.index, PACKET_MR_PROMISC, 0, b""))
            self._sock.setblocking(False)
        except OSError as exc:
            self.close()
            raise _capture_error(name, step, exc) from exc
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd {self._sock.fileno()}"
        return (f"AfPacketSource({self.interface.name!r}, linktype={self.linktype}, "
                f"{self.block_count}x{self.block_size}, {state})")

    def fileno(self) -> int:
        if self._sock is None:
            raise CaptureError(f"afpacket capture on {self.interface.name} is closed")
        return self._sock.fileno()

    def read(self) -> list[PacketBatch]:
        """Take every block the kernel has retired, in ring order, at most one lap."""
        words = self._words
        ring = self._ring
        if words is None or ring is None:
            return []
        batches: list[PacketBatch] = []
        block_size = self.block_size
        for _ in range(self.block_count):
            base = self._block * block_size
            word = base >> 2
            if not words[word + _BLOCK_STATUS] & TP_STATUS_USER:
                break
            if _FENCE is not None:
                _FENCE(_ACQUIRE)  # the header and records are read only after the status
            count = words[word + _NUM_PKTS]
            first = words[word + _OFFSET_TO_FIRST_PKT]
            end = words[word + _BLK_LEN]
            if count:
                if not first <= end <= block_size:
                    raise CaptureError(
                        f"afpacket capture on {self.interface.name}: corrupt ring block "
                        f"{self._block} (first packet at {first}, length {end})")
                # One copy of the used records; their next-record offsets are relative.
                batches.append(PacketBatch(self.interface.name, self.interface.index,
                                           self.linktype, ring[base + first:base + end], count))
            if _FENCE is not None:
                _FENCE(_RELEASE)  # the copy completes before the kernel may refill the block
            words[word + _BLOCK_STATUS] = TP_STATUS_KERNEL
            self._block = (self._block + 1) % self.block_count
        if not batches:
            self._clear_socket_error()
        return batches

    def _clear_socket_error(self) -> None:
        """Clear a pending socket error, so that the descriptor stops polling readable.

        When the interface goes down the kernel sets ENETDOWN on the socket; poll() then reports
        POLLERR until it is read. The capture resumes by itself when the interface comes back up,
        so this is not an error of the capture.
        """
        if self._sock is None:
            return
        try:
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            raise _capture_error(self.interface.name, "SO_ERROR", exc) from exc
        if code:
            log.info("afpacket capture on %s: %s", self.interface.name, os.strerror(code))

    def set_filter(self, program: BpfProgram) -> None:
        """Swap the kernel filter in place (``SO_ATTACH_FILTER`` replaces it atomically).

        Raises FilterError when the kernel refuses the program; the old filter stays in force.
        """
        if self._sock is None:
            raise CaptureError(f"afpacket capture on {self.interface.name} is closed")
        attach_filter(self._sock.fileno(), program)

    def stats(self) -> CaptureStats:
        """Cumulative counters: the kernel resets its own on every read, so we add them up."""
        if self._sock is not None:
            try:
                raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size)
            except OSError as exc:
                raise _capture_error(self.interface.name, "PACKET_STATISTICS", exc) from exc
            # tp_packets includes tp_drops: both count packets that passed the filter. Before
            # PACKET_VERSION is set (a failed open) the kernel answers the shorter tpacket_stats.
            packets, drops, freezes = TPACKET_STATS_V3.unpack(raw.ljust(TPACKET_STATS_V3.size,
                                                                        b"\0"))
            self._packets += packets
            self._drops += drops
            self.freezes += freezes
        return CaptureStats(self._packets, self._drops)

    def close(self) -> None:
        """Unmap the ring and close the socket; idempotent. Counters stay readable."""
        if self._sock is not None:
            try:
                self.stats()
            except CaptureError:
                pass
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass(frozen=True)
class AfPacketBackend:
    """Opens :class:`AfPacketSource` captures with one ring geometry."""

    block_size: int = DEFAULT_BLOCK_SIZE
    block_count: int = 16
    block_timeout_ms: int = 100
    name: ClassVar[str] = PLUGIN

    def __post_init__(self) -> None:
        problems = ring_problems(self.block_size, self.block_count, self.block_timeout_ms)
        if problems:
            raise ConfigError(problems)

    def open(self, interface: Interface, program: BpfProgram) -> AfPacketSource:
        return AfPacketSource(interface, program, self.block_size, self.block_count,
                              self.block_timeout_ms)


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup(PLUGIN, [
        Setting("block_size", int, DEFAULT_BLOCK_SIZE,
                "Bytes per ring block; a multiple of the page size that holds a 64 KiB frame.",
                minimum=1, maximum=1 << 30),
        Setting("block_count", int, 16, "Ring blocks per interface (memory: size x count).",
                minimum=2, maximum=1 << 16),
        Setting("block_timeout_ms", int, 100,
                "Milliseconds after which a block that is not full is handed over anyway.",
                minimum=1, maximum=60_000),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    settings = config.plugin(PLUGIN)
    problems = ring_problems(settings.block_size, settings.block_count, settings.block_timeout_ms)
    if problems:
        raise ConfigError(problems)


@hookimpl
def ossensor_capture_backend(config: SensorConfig) -> AfPacketBackend:
    settings = config.plugin(PLUGIN)
    return AfPacketBackend(settings.block_size, settings.block_count, settings.block_timeout_ms)
