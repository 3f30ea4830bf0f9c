"""Chunk uploads over one blocking keep-alive HTTPS connection, driven from a worker thread.

Why not aiohttp for the chunks: asyncio encrypts and writes in Python, one TLS record (16 KiB)
at a time, and that costs more CPU than the capture itself. Uploading 1 MiB bodies to a local
aiohttp server over TLS cost 2.4-3.0 ms of client CPU per MiB here with aiohttp (on asyncio or
uvloop), against 1.3 ms with a blocking ``http.client`` connection, whose ``sendall`` hands the
whole body to OpenSSL in one call with the GIL released. Registration, heartbeats and the
Antigena websocket stay on aiohttp; only the bulk of the bytes goes this way.

Verification is the transport's: a pinned SHA-256 fingerprint of the DER certificate (checked
after the handshake), the system CAs or a CA file, or none at all when the user turned it off.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
from dataclasses import dataclass

from ossensor_core.client.tls import client_context
from ossensor_core.wire.names import MAX_ANSWER_BYTES

__all__ = ["BulkAnswer", "BulkConnection", "BulkError", "client_context"]


class BulkError(Exception):
    """A request that did not complete; ``state`` names the kind (tls, timeout, unreachable)."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


@dataclass(frozen=True)
class BulkAnswer:
    status: int
    text: str
    retry_after: str | None


class BulkConnection:
    """One keep-alive connection; use it from one thread at a time."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, fingerprint: str,
                 timeout: float) -> None:
        self.host, self.port = host, port
        self.context = context
        self.fingerprint = fingerprint  # lower-case hex without colons, or ""
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None

    def _connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                           context=self.context)
        conn.connect()
        if self.fingerprint:
            assert conn.sock is not None
            der = conn.sock.getpeercert(binary_form=True) or b""
            if hashlib.sha256(der).hexdigest() != self.fingerprint:
                conn.close()
                raise BulkError("tls", "the vSensor's certificate does not match the pinned "
                                "fingerprint")
        return conn

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> BulkAnswer:
        """POST ``body``; a connection the server closed while idle is reopened once (chunks
        are deduplicated by the vSensor, so sending one again is safe)."""
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._conn.request("POST", path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read(MAX_ANSWER_BYTES + 1)  # an acknowledgement: a few bytes
                if len(data) > MAX_ANSWER_BYTES:
                    self.close()
                    raise BulkError("bad-answer", f"the vSensor's answer is larger than "
                                    f"{MAX_ANSWER_BYTES} bytes")
                text = data.decode(errors="replace")
                if response.will_close:
                    self.close()
                return BulkAnswer(response.status, text, response.getheader("Retry-After"))
            except BulkError:
                self.close()
                raise
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue
                raise BulkError("unreachable", f"{type(exc).__name__}: {exc}") from None
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise BulkError("tls", f"the vSensor's certificate is not trusted "
                                f"({exc.verify_message})") from None
            except (TimeoutError, socket.timeout):
                self.close()
                raise BulkError("timeout", f"no answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                strerror = exc.strerror if isinstance(exc, OSError) else None
                message = strerror or f"{type(exc).__name__}: {exc}"
                raise BulkError("unreachable", message) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
