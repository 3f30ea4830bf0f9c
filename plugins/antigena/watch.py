"""The socket that sees only blocked traffic: one AF_PACKET socket on every interface, its
kernel filter (``actions.watch_filter``, compiled by the caller) swapped in one step whenever
the actions change, closed while none is in force."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from ossensor_core.capture.batch import LINKTYPE_ETHERNET
from ossensor_core.capture.bpf import BpfProgram, attach_filter, compile_filter
from ossensor_core.errors import FilterError

log = logging.getLogger("ossensor_plugins.antigena")

ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
RECV_BYTES = 1 << 18
READ_BURST = 256


class BlockWatch:
    """One AF_PACKET socket on all interfaces, filtered in the kernel to blocked tuples."""

    def __init__(self, on_frame: Callable[[str, bytes], None]) -> None:
        self.on_frame = on_frame
        self.sock: socket.socket | None = None
        self.expression = ""

    def set_filter(self, expression: str) -> None:
        """Watch ``expression`` (empty: close the socket), compiled here. Raises FilterError."""
        if expression == self.expression:
            return
        self.set_program(compile_filter(expression, LINKTYPE_ETHERNET) if expression else None)

    def set_program(self, program: BpfProgram | None) -> None:
        """Watch with ``program`` (None: close the socket); raises FilterError or OSError and
        then keeps the program it had."""
        if program is None:
            self.close()
            return
        if program.expression == self.expression:
            return
        program.check_kernel_limit()
        if self.sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setblocking(False)
            try:
                attach_filter(sock.fileno(), program)
            except FilterError:
                sock.close()
                raise
            self._drain(sock)  # what arrived before the filter was attached
            self.sock = sock
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        else:
            attach_filter(self.sock.fileno(), program)  # swapped in one step
        self.expression = program.expression

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(RECV_BYTES)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(READ_BURST):
            try:
                frame, address = sock.recvfrom(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("Antigena: reading the watch socket failed: %s", exc)
                return
            interface, _, _, hatype = address[:4]
            if hatype == ARPHRD_ETHER:
                self.on_frame(interface, frame)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.expression = ""
