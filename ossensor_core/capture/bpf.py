"""Compile BPF filter expressions with libpcap, in process, for a given link type.

The result is the classic BPF program that ``SO_ATTACH_FILTER`` takes. We call libpcap through
ctypes (``pcap_open_dead`` + ``pcap_compile``) rather than spawning tcpdump: no subprocess, the
exact error message of libpcap, and a snapshot length we choose. The program's accept instruction
returns the snapshot length, and the kernel truncates every packet to it, so it must cover the
largest frame (veth GSO frames reach 64 KiB): we use 262144 like tcpdump.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from dataclasses import dataclass
from functools import lru_cache

from ossensor_core.errors import FilterError
from ossensor_core.wire.names import LINKTYPE_ETHERNET, LINKTYPE_RAW, SNAPLEN

SO_ATTACH_FILTER = 26  # asm-generic/socket.h; Python's socket module does not export it
BPF_MAXINSNS = 4096  # the kernel refuses longer classic BPF programs (include/uapi/linux/bpf_common.h)
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF


# libpcap's pcap_open_dead takes a DLT_* value; they equal the LINKTYPE_* values except for a few.
_LINKTYPE_TO_DLT = {LINKTYPE_RAW: 12}

# ARPHRD_* (the interface's hardware type, from netlink) to the link type a SOCK_RAW packet socket
# delivers, following libpcap's pcap-linux.c for the types a sensor meets on a node.
ARPHRD_TO_LINKTYPE: dict[int, int] = {
    1: LINKTYPE_ETHERNET,  # ARPHRD_ETHER
    768: LINKTYPE_RAW,  # ARPHRD_TUNNEL (ipip)
    769: LINKTYPE_RAW,  # ARPHRD_TUNNEL6
    776: LINKTYPE_RAW,  # ARPHRD_SIT
    778: LINKTYPE_RAW,  # ARPHRD_IPGRE
    823: LINKTYPE_RAW,  # ARPHRD_IP6GRE
    0xFFFE: LINKTYPE_RAW,  # ARPHRD_NONE (tun, WireGuard)
}


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


@lru_cache(maxsize=1)
def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap")
    candidates = [name] if name else []
    candidates += ["libpcap.so.1", "libpcap.so.0.8", "libpcap.so"]
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    else:
        raise FilterError("libpcap is not installed (needed to compile BPF filters): "
                          "install libpcap0.8 or libpcap")
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_freecode.restype = None
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_close.restype = None
    return lib


# pcap_compile is not thread-safe in libpcap before 1.8 and holds a global parser.
_lock = threading.Lock()


@dataclass(frozen=True)
class BpfProgram:
    """A compiled classic BPF program: the instructions as (code, jt, jf, k) and its source."""

    expression: str
    linktype: int
    instructions: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.instructions)

    def packed(self) -> bytes:
        """The instructions as ``struct sock_filter[]``, ready for ``SO_ATTACH_FILTER``."""
        return b"".join(struct.pack("HBBI", *insn) for insn in self.instructions)

    def check_kernel_limit(self) -> None:
        if len(self.instructions) > BPF_MAXINSNS:
            raise FilterError(
                f"filter compiles to {len(self.instructions)} BPF instructions, more than the "
                f"kernel's limit of {BPF_MAXINSNS}: {_shorten(self.expression)}"
            )


def _shorten(expression: str, limit: int = 120) -> str:
    return repr(expression if len(expression) <= limit else expression[:limit] + "...")


@lru_cache(maxsize=64)
def compile_filter(expression: str, linktype: int = LINKTYPE_ETHERNET) -> BpfProgram:
    """Compile ``expression`` for ``linktype``; raise FilterError with libpcap's message.

    An empty expression compiles to a program that accepts every packet whole. Results are cached:
    a filter naming hundreds of hosts takes seconds to compile.
    """
    lib = _libpcap()
    with _lock:
        handle = lib.pcap_open_dead(_LINKTYPE_TO_DLT.get(linktype, linktype), SNAPLEN)
        if not handle:
            raise FilterError(f"libpcap cannot open a handle for link type {linktype}")
        program = _BpfProgram()
        try:
            if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1,
                                PCAP_NETMASK_UNKNOWN) != 0:
                message = (lib.pcap_geterr(handle) or b"unknown error").decode(errors="replace")
                raise FilterError(f"filter {_shorten(expression)} does not compile: {message}")
            instructions = tuple(
                (insn.code, insn.jt, insn.jf, insn.k)
                for insn in program.bf_insns[: program.bf_len]
            )
            lib.pcap_freecode(ctypes.byref(program))
        finally:
            lib.pcap_close(handle)
    return BpfProgram(expression, linktype, instructions)


def combine_filters(*expressions: str) -> str:
    """AND the non-empty expressions, each in parentheses: ``(a) and (b)``."""
    parts = [e.strip() for e in expressions if e and e.strip()]
    if len(parts) == 1:
        return parts[0]
    return " and ".join(f"({part})" for part in parts)


def attach_filter(sock_fd: int, program: BpfProgram) -> None:
    """Attach (or atomically replace) the socket's kernel filter.

    Replacing a filter with ``SO_ATTACH_FILTER`` swaps it in one step: no packet is seen unfiltered
    and none is lost in between, so filters change at run time without reopening the socket.
    """
    import socket

    program.check_kernel_limit()
    code = ctypes.create_string_buffer(program.packed())
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    sock = socket.socket(fileno=sock_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        raise FilterError(f"the kernel refused the filter {_shorten(program.expression)}: "
                          f"{exc.strerror}") from exc
    finally:
        sock.detach()
