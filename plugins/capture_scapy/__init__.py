"""The portable capture backend: scapy's Linux packet socket, one ``recvmsg`` per packet.

Slower than ``afpacket`` (a system call and a few Python objects per packet, no ring), but it
needs nothing beyond scapy and a ``SOCK_RAW`` packet socket, so it is the fallback wherever the
TPACKET_V3 ring is unavailable or suspect. Packets are never dissected: scapy's ``_recv_raw``
hands over the bytes (with a VLAN tag put back from ``PACKET_AUXDATA``) and we lay them out as a
:class:`~ossensor_core.capture.batch.PacketBatch`.

Settings (``OSSENSOR_SCAPY_*``): ``rcvbuf``, the socket receive buffer, and ``batch_packets``,
the most packets one :meth:`ScapyCapture.read` returns.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.capture.bpf import BpfProgram, attach_filter
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.errors import CaptureError, FilterError
from ossensor_core.node.interfaces import Interface
from ossensor_core.plugin import SNAPLEN, hookimpl
from ossensor_core.pipeline.contracts import CaptureStats
from ossensor_core.pipeline.settings import Setting, SettingsGroup

log = logging.getLogger(__name__)

# Constants the socket module does not export (include/uapi/linux/if_packet.h, asm/socket.h; the
# SO_* values are those of the generic and x86 ABIs, not of alpha, mips, parisc or sparc).
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35

# Bytes asked of each recvmsg: SNAPLEN, the snapshot length our compiled filters return, so
# that no packet the kernel accepted is cut short again here (veth and loopback GSO frames
# reach 64 KiB).

_TPACKET_STATS = struct.Struct("=II")  # struct tpacket_stats: tp_packets, tp_drops
# struct tpacket_auxdata: status, len (on the wire), snaplen (as queued), mac, net, vlan tci, tpid
_AUXDATA = struct.Struct("=IIIHHHH")
_TIMESPEC64 = struct.Struct("=qq")  # struct timespec on 64-bit ABIs
_TIMESPEC32 = struct.Struct("=ii")
# "ret #0": drop every packet. Attached while draining what queued before our filter, as libpcap
# does, so that not one unfiltered packet reaches the first batch.
_REJECT_ALL = ((0x06, 0, 0, 0),)


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("scapy", [
        Setting("rcvbuf", int, 32 << 20,
                "Socket receive buffer in bytes (the kernel queue between two reads).",
                minimum=65536, maximum=(1 << 31) - 1),
        Setting("batch_packets", int, 1024,
                "Most packets read into one batch before it is handed on.", minimum=1,
                maximum=1 << 20),
    ])


@hookimpl
def ossensor_capture_backend(config: SensorConfig) -> ScapyBackend:
    settings = config.plugin("scapy")
    return ScapyBackend(rcvbuf=settings.rcvbuf, batch_packets=settings.batch_packets)


class ScapyBackend:
    """Opens :class:`ScapyCapture` sources; scapy itself is imported on the first open."""

    name = "scapy"

    def __init__(self, rcvbuf: int = 32 << 20, batch_packets: int = 1024) -> None:
        self.rcvbuf = rcvbuf
        self.batch_packets = batch_packets

    def open(self, interface: Interface, program: BpfProgram) -> ScapyCapture:
        linktype = interface.linktype
        if linktype is None:
            raise CaptureError(f"cannot capture on {interface.name}: its link type "
                               f"(ARPHRD {interface.arphrd}) is not supported")
        if program.linktype != linktype:
            raise CaptureError(f"cannot capture on {interface.name}: the filter was compiled for "
                               f"link type {program.linktype}, the interface has {linktype}")
        sock = _open_socket(interface)
        try:
            _prepare_socket(sock, interface.name, program, self.rcvbuf)
        except BaseException:
            _close_quietly(sock)
            raise
        return ScapyCapture(interface, linktype, sock, self.batch_packets)


class _AncillaryTap:
    """Stands in for the socket in scapy's ``_recv_raw`` and keeps the control messages.

    ``_recv_raw`` turns the nanosecond timestamp into a float (which holds today's Unix time
    only to about 240 ns) and drops the wire length; both are in the control messages it
    reads, so we read them there too.
    """

    __slots__ = ("sock", "ancdata")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ancdata: Sequence[tuple[int, int, bytes]] = ()

    def recvmsg(self, *args: int) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        result = self.sock.recvmsg(*args)
        self.ancdata = result[1]
        return result


class ScapyCapture:
    """One scapy packet socket on one interface, read without blocking."""

    def __init__(self, interface: Interface, linktype: int, sock: Any, batch_packets: int) -> None:
        self.interface = interface
        self.linktype = linktype
        self.flush_seconds = 0.0  # packets are readable from the socket as soon as they arrive
        self.batch_packets = batch_packets
        self._sock: Any = sock
        self._tap = _AncillaryTap(sock.ins)
        self._packets = 0
        self._drops = 0
        self._pending: CaptureError | None = None

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"ScapyCapture({self.interface.name!r}, linktype={self.linktype}, {state})"

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.ins.fileno()

    def read(self) -> list[PacketBatch]:
        """Drain up to ``batch_packets`` queued packets into one batch (none: empty list)."""
        if self._pending is not None:
            error, self._pending = self._pending, None
            raise error
        if self._sock is None:
            raise CaptureError(f"capture on {self.interface.name} is closed")
        receive = self._sock._recv_raw
        tap = self._tap
        frames: list[tuple[int, int, bytes]] = []
        for _ in range(self.batch_packets):
            try:
                frame, _, _ = receive(tap, SNAPLEN)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENETDOWN:
                    # Reported once when the interface goes down; the socket stays bound and
                    # resumes when it comes back up (the netlink watch reports the change).
                    log.debug("capture on %s: interface went down", self.interface.name)
                    break
                error = CaptureError(f"cannot read from {self.interface.name}: "
                                     f"{exc.strerror or exc}")
                error.__cause__ = exc
                if not frames:
                    raise error
                self._pending = error  # hand over what was read, report the error next time
                break
            if frame:
                frames.append(_frame_record(frame, tap.ancdata))
        if not frames:
            return []
        return [PacketBatch.from_frames(self.interface.name, self.interface.index, self.linktype,
                                        frames)]

    def set_filter(self, program: BpfProgram) -> None:
        """Swap the kernel filter in one step (``SO_ATTACH_FILTER`` replaces it atomically)."""
        if self._sock is None:
            raise CaptureError(f"capture on {self.interface.name} is closed")
        if program.linktype != self.linktype:
            raise FilterError(f"{self.interface.name}: the filter was compiled for link type "
                              f"{program.linktype}, the interface has {self.linktype}")
        try:
            attach_filter(self._sock.ins.fileno(), program)
        except FilterError as exc:
            raise FilterError(f"{self.interface.name}: {exc}") from exc

    def stats(self) -> CaptureStats:
        """Kernel counters since open; the kernel resets them on each read, so we add them up."""
        if self._sock is not None:
            try:
                packets, drops = _read_kernel_stats(self._sock.ins)
            except OSError as exc:
                raise CaptureError(f"cannot read the statistics of {self.interface.name}: "
                                   f"{exc.strerror or exc}") from exc
            self._packets += packets
            self._drops += drops
        return CaptureStats(self._packets, self._drops)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            _close_quietly(sock)


def _frame_record(frame: bytes,
                  ancdata: Sequence[tuple[int, int, bytes]]) -> tuple[int, int, bytes]:
    """``(timestamp_ns, wire_length, frame)`` from the control messages of one recvmsg."""
    timestamp_ns = 0
    wire_length = len(frame)
    for level, kind, data in ancdata:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
            _, length, snaplen, *_ = _AUXDATA.unpack_from(data)
            # tp_len is the length before the filter's snapshot cut; the frame may be longer
            # than tp_snaplen by the VLAN tag that _recv_raw put back, which is on the wire too.
            wire_length = length + len(frame) - snaplen
        elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            if len(data) >= _TIMESPEC64.size:
                seconds, nanoseconds = _TIMESPEC64.unpack_from(data)
            elif len(data) >= _TIMESPEC32.size:
                seconds, nanoseconds = _TIMESPEC32.unpack_from(data)
            else:
                continue
            timestamp_ns = seconds * 1_000_000_000 + nanoseconds
    if not timestamp_ns:  # no SO_TIMESTAMPNS (very old kernels): the time we read it
        timestamp_ns = time.time_ns()
    return timestamp_ns, wire_length, frame


@contextmanager
def _quiet_type_guess() -> Iterator[None]:
    """Silence scapy's "Unable to guess type" warning: we never dissect, and without
    ``scapy.all`` loaded it warns for every interface, Ethernet included."""
    logger = logging.getLogger("scapy.runtime")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable to guess type")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _open_socket(interface: Interface) -> Any:
    """scapy's listening packet socket, bound to ``interface``, promiscuous, with no filter."""
    name = interface.name
    try:
        from scapy.arch.linux import L2ListenSocket
        from scapy.config import conf
        from scapy.error import Scapy_Exception
    except ImportError as exc:
        raise CaptureError(f"cannot capture on {name}: scapy cannot be imported ({exc})") from exc
    try:
        # scapy resolves names through its own interface list, read once: refresh it when the
        # interface is new to it or was re-created under the same name with another index.
        known = conf.ifaces.get(name)
        if known is None or known.index != interface.index:
            conf.ifaces.reload()
        with _quiet_type_guess():
            return L2ListenSocket(iface=name, promisc=True, nofilter=1)
    except PermissionError as exc:
        raise CaptureError(f"cannot capture on {name}: needs CAP_NET_RAW "
                           f"({exc.strerror or exc})") from exc
    except OSError as exc:
        raise CaptureError(f"cannot capture on {name}: {exc.strerror or exc}") from exc
    except (ValueError, Scapy_Exception) as exc:
        raise CaptureError(f"cannot capture on {name}: {exc}") from exc


def _prepare_socket(sock: Any, name: str, program: BpfProgram, rcvbuf: int) -> None:
    """Attach ``program`` with nothing unfiltered queued, size the buffer, go non-blocking.

    scapy binds before we can attach our filter (its own compiles for a 65535 snapshot), so
    packets of every kind may already be queued: reject all, drain, reset the counters, then
    attach ours.
    """
    ins: socket.socket = sock.ins
    try:
        attach_filter(ins.fileno(), BpfProgram("(reject all while draining)", program.linktype,
                                               _REJECT_ALL))
        ins.setblocking(False)
        for _ in range(1 << 20):  # bounded: the queue holds at most a receive buffer of packets
            try:
                ins.recv(1)
            except BlockingIOError:
                break
        try:
            ins.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:  # no CAP_NET_ADMIN: capped at net.core.rmem_max
            ins.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        _read_kernel_stats(ins)
        attach_filter(ins.fileno(), program)
    except FilterError as exc:
        raise CaptureError(f"cannot capture on {name}: {exc}") from exc
    except PermissionError as exc:
        raise CaptureError(f"cannot capture on {name}: needs CAP_NET_RAW "
                           f"({exc.strerror or exc})") from exc
    except OSError as exc:
        raise CaptureError(f"cannot capture on {name}: {exc.strerror or exc}") from exc


def _read_kernel_stats(sock: socket.socket) -> tuple[int, int]:
    """``PACKET_STATISTICS``: packets queued (drops included) and dropped since the last call."""
    packets, drops = _TPACKET_STATS.unpack(
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size))
    return packets, drops


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except (OSError, ValueError) as exc:  # closing must not fail shutdown
        log.debug("closing a scapy socket: %s", exc)
