"""Where the vSensor meets the network: connection caps at accept, TLS with a deadline, and
deadlines for headers, so that a stranger costs almost nothing.

aiohttp alone closes idle keep-alive connections (``keepalive_timeout``) and little else: a
client could hold a connection with half its headers, or a TLS handshake never finished, for
as long as it liked, and there was no cap on connections. :class:`GuardedSite` listens in
place of ``web.TCPSite``:

- every accepted connection is counted, overall and per client address, *before* TLS; one
  over either cap is reset at once (no handshake, no buffer);
- TLS is started by hand (``loop.start_tls``) with ``handshake_seconds`` to finish;
- once a request's first byte has arrived its headers must be complete within
  ``header_seconds`` (aiohttp runs the handler only then);
- requests in flight are capped overall and per address (:func:`request_gate`): ``503 busy``
  with ``Retry-After`` beyond;
- behind a TCP load balancer (``proxy_protocol_from``), a connection from the balancer is
  counted, capped and shown by the client address of its PROXY header (:mod:`.proxy_protocol`),
  read before TLS within ``handshake_seconds``.

The body deadline and the header-first checks live in :mod:`.auth`. A request in progress has
no connection deadline here: Antigena's websocket (which pings) stays open for as long as it
lives. The bounds are :class:`~.settings.VSensorSettings` fields; ``docs/security.md`` gives
their figures.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from ossensor_core.wire.names import Reason

from . import proxy_protocol
from .answers import refusal
from .settings import VSensorSettings

log = logging.getLogger("ossensor_vsensor")

RETRY_AFTER_SECONDS = 5
#: Request key: ``(address, port)`` of the load balancer's front end the client connected to,
#: from its PROXY header (absent for direct connections).
BALANCER_FRONT = web.RequestKey("balancer_front", tuple)
#: At most one "connection refused" log line per this many seconds (a flood must not fill logs).
_REFUSAL_LOG_SECONDS = 10.0


def client_key(address: str) -> str:
    """What the per-address caps count by: an IPv4 address, or an IPv6 address's /64 (one
    host usually holds a whole /64, so counting single IPv6 addresses would cap nothing)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionCounts:
    """Open connections and requests in flight, overall and per client address."""

    def __init__(self, settings: VSensorSettings) -> None:
        self.settings = settings
        self.connections: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.total_connections = 0
        self.total_requests = 0
        self.refused_connections = 0
        self._last_refusal_log = 0.0
        self.sites: list[GuardedSite] = []

    def gate_of(self, request: web.BaseRequest) -> _Gate | None:
        """The connection a request came on, when it came through a :class:`GuardedSite`."""
        for site in self.sites:
            gate = site.gate_of(request)
            if gate is not None:
                return gate
        return None

    def admit_connection(self, address: str) -> bool:
        """Count a new connection from ``address``; False (not counted) over a cap."""
        s = self.settings
        if (self.total_connections >= s.max_connections
                or self.connections[address] >= s.max_connections_per_address):
            self.refused_connections += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= _REFUSAL_LOG_SECONDS:
                self._last_refusal_log = now
                log.warning("refusing connections from %s: %d open from it, %d in all (limits "
                            "%d per address, %d in all; %d refused so far)", address,
                            self.connections[address], self.total_connections,
                            s.max_connections_per_address, s.max_connections,
                            self.refused_connections)
            return False
        self.connections[address] += 1
        self.total_connections += 1
        return True

    def release_connection(self, address: str) -> None:
        self.total_connections -= 1
        self.connections[address] -= 1
        if self.connections[address] <= 0:
            del self.connections[address]

    def admit_request(self, address: str) -> bool:
        s = self.settings
        if (self.total_requests >= s.max_requests
                or self.requests[address] >= s.max_requests_per_address):
            return False
        self.requests[address] += 1
        self.total_requests += 1
        return True

    def release_request(self, address: str) -> None:
        self.total_requests -= 1
        self.requests[address] -= 1
        if self.requests[address] <= 0:
            del self.requests[address]


class _Gate(asyncio.Protocol):
    """One accepted connection: counted, then TLS, then aiohttp's handler behind it.

    It stays the TLS transport's protocol and passes every event on to the handler, so that it
    sees when bytes arrive between requests (the header deadline) and when the connection ends
    (the counts)."""

    def __init__(self, site: GuardedSite) -> None:
        self.site = site
        self.address = ""
        self.admitted = False
        self.raw: asyncio.Transport | None = None
        self.tls: asyncio.Transport | None = None
        self.handler: asyncio.Protocol | None = None
        self.pending: list[bytes] = []
        self.in_request = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        #: The client's address from the load balancer's PROXY header (None: not proxied), and
        #: the balancer's address and port it connected to.
        self.proxied: str | None = None
        self.front: tuple[str, int] | None = None

    # -- the raw TCP connection, before TLS --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        peer = transport.get_extra_info("peername")
        peer_address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.address = client_key(peer_address)
        if self.site.from_balancer(peer_address):
            transport.pause_reading()
            self.task = asyncio.get_running_loop().create_task(self._read_proxy_header())
            return
        self._admit()

    def _admit(self) -> None:
        assert self.raw is not None
        if not self.site.counts.admit_connection(self.address):
            self.raw.abort()
            return
        self.admitted = True
        self.site.gates.add(self)
        self.task = asyncio.get_running_loop().create_task(self._start_tls())

    async def _read_proxy_header(self) -> None:
        """Take the PROXY header off the socket, and nothing after it (the TLS handshake stays
        for ``start_tls``): peek until it is whole, then read exactly its length."""
        assert self.raw is not None
        balancer = self.address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.site.settings.handshake_seconds
        sock = socket.socket(fileno=os.dup(self.raw.get_extra_info("socket").fileno()))
        try:
            sock.setblocking(False)
            seen = b""
            while True:
                try:
                    data = sock.recv(proxy_protocol.MAX_V2_BYTES, socket.MSG_PEEK)
                except BlockingIOError:
                    data = None
                if data == b"":
                    raise ConnectionError("closed before its PROXY header")
                if data:
                    header = proxy_protocol.parse(data)
                    if header is not None:
                        break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"no whole PROXY header within "
                                       f"{self.site.settings.handshake_seconds:g} s")
                if data and data == seen:  # part of it, and nothing new: wait a little
                    await asyncio.sleep(min(0.01, remaining))
                else:
                    seen = data or b""
                    await _readable(sock, remaining)
            length, client, front = header
            if len(sock.recv(length)) != length:
                raise ConnectionError("the PROXY header could not be read whole")
        except (ValueError, OSError, TimeoutError) as exc:
            log.warning("closed a connection from the load balancer %s: %s", balancer, exc)
            self.raw.abort()
            return
        finally:
            sock.close()
        if client is not None:
            self.proxied = client
            self.front = front
            self.address = client_key(client)
        if not self.closed:
            self._admit()

    async def _start_tls(self) -> None:
        assert self.raw is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                self.raw, self, self.site.tls_context, server_side=True,
                ssl_handshake_timeout=self.site.settings.handshake_seconds)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.address, exc)
            self.raw.abort()
            self._release()
            return
        if tls is None or self.closed:
            if tls is not None:
                tls.abort()
            self._release()
            return
        self.tls = tls
        self.site.by_transport[tls] = self
        handler = self.site.new_handler()
        self.handler = handler
        handler.connection_made(tls)
        # The first request's headers are due as any later one's: from the first byte on.
        self._arm(self.site.settings.header_seconds, "no complete request headers")
        pending, self.pending = self.pending, []
        for data in pending:
            self.data_received(data)

    # -- events of the TLS connection, passed on to aiohttp's handler ------------------------

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            # Only between the handshake's end and the handler's start (one turn of the loop):
            # at most one TLS read, which asyncio bounds (256 KiB).
            self.pending.append(data)
            return
        if not self.in_request and self.timer is None:
            self._arm(self.site.settings.header_seconds, "request headers incomplete")
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            return self.handler.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self.tls is not None:
            self.site.by_transport.pop(self.tls, None)
        if self.handler is not None:
            self.handler.connection_lost(exc)
        self._release()

    # -- requests (told by request_gate) -----------------------------------------------------

    def request_started(self) -> None:
        self.in_request = True
        self._disarm()

    def request_done(self) -> None:
        # Idle again: aiohttp's keep-alive timeout (idle_seconds) applies until the next
        # request's first byte, which arms the header deadline.
        self.in_request = False
        self._disarm()

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire, seconds, what)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self, seconds: float, what: str) -> None:
        self.timer = None
        if self.in_request or self.closed:
            return
        log.info("closed the connection from %s: %s after %g s", self.address, what, seconds)
        if self.tls is not None:
            self.tls.abort()

    def _release(self) -> None:
        if self.admitted:
            self.admitted = False
            self.site.gates.discard(self)
            self.site.counts.release_connection(self.address)

    def abort(self) -> None:
        """Close at once (the site stops)."""
        transport = self.tls or self.raw
        if transport is not None:
            transport.abort()


async def _readable(sock: socket.socket, timeout: float) -> None:
    """Until ``sock`` has bytes to read (or ``timeout`` passes)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        loop.remove_reader(sock.fileno())


class GuardedSite(web.BaseSite):
    """A TLS site like ``web.TCPSite``, with :mod:`this module's <.server>` caps and deadlines.

    The runner must be made with :func:`runner_options` (aiohttp's own keep-alive timeout and
    no lingering: a body left unread closes the connection instead of being read for 10 s)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 ssl_context: ssl.SSLContext, settings: VSensorSettings,
                 counts: ConnectionCounts, backlog: int = 1024) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host = host
        self.port = port
        self.tls_context = ssl_context
        self.settings = settings
        self.counts = counts
        self.gates: set[_Gate] = set()
        self.by_transport: dict[asyncio.BaseTransport, _Gate] = {}
        self.balancers = [ipaddress.ip_network(n, strict=False)
                          for n in settings.proxy_protocol_from]
        counts.sites.append(self)

    def from_balancer(self, address: str) -> bool:
        """Whether a connection from ``address`` starts with a PROXY header."""
        if not self.balancers:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.balancers)

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def new_handler(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None, "the runner is not set up"
        return server()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Gate(self), self.host, self.port,
                                                backlog=self._backlog)
        if self.port == 0 and self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        for gate in list(self.gates):
            if gate.handler is None:  # still in its handshake: aiohttp does not know it
                gate.abort()

    def gate_of(self, request: web.BaseRequest) -> _Gate | None:
        transport = request.transport
        return self.by_transport.get(transport) if transport is not None else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_gate(counts: ConnectionCounts) -> Callable[[web.Request, Handler],
                                                 Awaitable[web.StreamResponse]]:
    """Middleware: caps requests in flight and tells each connection when a request starts and
    ends (its header deadline stops and restarts)."""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = counts.gate_of(request)
        if connection is not None and connection.proxied is not None:
            # Behind a load balancer: the client is who its PROXY header says, for the caps,
            # the logs and what Antigena learns of the sensor's addresses.
            request = request.clone(remote=connection.proxied)
            if connection.front is not None:
                request[BALANCER_FRONT] = connection.front
        address = client_key(request.remote or "?")
        if not counts.admit_request(address):
            log.warning("refused %s %s from %s: too many requests in flight (%d from it, %d in "
                        "all)", request.method, request.path, address, counts.requests[address],
                        counts.total_requests)
            answer = refusal(Reason.BUSY, counts.settings.now(), 503)
            answer.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            answer.force_close()
            return answer
        if connection is not None:
            connection.request_started()
        try:
            return await handler(request)
        finally:
            counts.release_request(address)
            if connection is not None:
                connection.request_done()

    return gate


def runner_options(settings: VSensorSettings) -> dict[str, float]:
    """``web.AppRunner`` keyword arguments that go with :class:`GuardedSite`."""
    return {"keepalive_timeout": settings.idle_seconds, "lingering_time": 0.0}


async def start_guarded(app: web.Application, settings: VSensorSettings, counts: ConnectionCounts,
                        host: str, port: int,
                        context: ssl.SSLContext) -> tuple[web.AppRunner, GuardedSite]:
    """Set ``app`` up and listen on ``host:port`` through a :class:`GuardedSite`; the caller
    cleans the runner up (which stops the site and completes the open files)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           **runner_options(settings))
    await runner.setup()
    site = GuardedSite(runner, host, port, context, settings, counts)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
