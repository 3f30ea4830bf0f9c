"""Posting to the vSensor: an aiohttp session for registration and heartbeats, the blocking
bulk connection (``bulk.py``) for chunks, every request signed afresh (new nonce and timestamp).

Registration always goes to the configured address; once a load balancer answers with the
vSensor's own address (``direct``) the rest goes there, until that address fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from typing import Any

import aiohttp

from ossensor_core.client import VSensorTls, base_url, new_instance, signed_headers
from ossensor_core.client.tls import AiohttpTls
from ossensor_core.runtime.logsetup import level
from ossensor_core.runtime.threads import named_executor
from ossensor_core.wire.names import MAX_ANSWER_BYTES, PATH_CHUNKS, PATH_REGISTER, SHA256

from .answers import Refused, read_bounded, reason_of, retry_after, state_of
from .bulk import BulkAnswer, BulkConnection, BulkError

log = logging.getLogger(__package__)  # one logger for the whole transport

DIRECT_RETRY_SECONDS = 300.0  # a failed direct address is not used again for this long


class VSensorConnection:
    """The transport's requests to one vSensor; see the module docstring."""

    def __init__(self, host: str, port: int, key: str, sensor: str, tls: VSensorTls,
                 timeout_seconds: float) -> None:
        self.host, self.port = host, port
        self.base_url = base_url(host, port)
        self._key = key
        self.sensor = sensor
        self.tls = tls
        self.timeout_seconds = timeout_seconds
        self.instance = new_instance()  # replaced by the spool folder's, when there is one
        self.protocol_version: int | None = None
        self.digest = SHA256  # the body digest signatures use; BLAKE3 once the vSensor takes it
        self._session: aiohttp.ClientSession | None = None
        self._bulk: BulkConnection | None = None
        self._bulk_thread: concurrent.futures.ThreadPoolExecutor | None = None
        # The vSensor's own address when registration went through a load balancer that
        # answered with one (``direct``); None: the configured address for everything.
        self._direct: tuple[str, int] | None = None
        self._direct_refused_until = 0.0  # after a failure: back to the load balancer a while

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def open(self) -> AiohttpTls:
        """The session and the bulk connection's thread; returns the TLS setting in use."""
        tls = self.tls.for_aiohttp()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        self._bulk_thread = named_executor("https-upload", 1)
        self._new_bulk()
        return tls

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._bulk_thread is not None and self._bulk is not None:
            # Queued behind a post still in flight (bounded by the timeout), then the thread ends.
            self._bulk_thread.submit(self._bulk.close)
            self._bulk_thread.shutdown(wait=False)

    # -- the target ---------------------------------------------------------------------------

    def _new_bulk(self) -> None:
        """A chunk connection to the current target; the old one is closed on its thread."""
        host, port = self._direct or (self.host, self.port)
        if self._bulk is not None and self._bulk_thread is not None:
            self._bulk_thread.submit(self._bulk.close)
        self._bulk = BulkConnection(host, port, self.tls.for_blocking_client(), self.tls.pin,
                                    self.timeout_seconds)

    def url(self, path: str) -> str:
        """Registration always goes to the configured address; the rest to the vSensor's
        direct address once it gave one."""
        if self._direct is None or path == PATH_REGISTER:
            return self.base_url + path
        return base_url(*self._direct) + path

    def use_direct(self, direct: Any) -> None:
        """Follow the ``direct`` address of a registration answer (or go back without one)."""
        target = None
        if isinstance(direct, dict) and time.monotonic() >= self._direct_refused_until:
            host, port = direct.get("host"), direct.get("port")
            if isinstance(host, str) and 0 < len(host) <= 253 and type(port) is int \
                    and 0 < port < 65536 \
                    and (host, port) != (self.host, self.port):
                target = (host, port)
        if target == self._direct:
            return
        self._direct = target
        self._new_bulk()
        if target is not None:
            log.info("the vSensor answered through %s with its own address: talking to %s from "
                     "now on", self.base_url, self.url("").rstrip("/"))

    def direct_failed(self, failure: Refused) -> bool:
        """When the direct address fails, go back to the configured one (and register there
        again) for five minutes; True when that happened."""
        if self._direct is None or failure.state not in ("unreachable", "timeout", "tls"):
            return False
        log.warning("the vSensor's direct address %s failed (%s); back to %s", self.url(""),
                    failure, self.base_url)
        self._direct_refused_until = time.monotonic() + DIRECT_RETRY_SECONDS
        self._direct = None
        self._new_bulk()
        return True

    # -- requests -----------------------------------------------------------------------------

    def without_key(self, text: str) -> str:
        """An answer's text, safe to log: we never send the key, and never log it either."""
        return text.replace(self._key, "***") if self._key and self._key in text else text

    async def post(self, path: str, body: bytes,
                   headers: dict[str, str]) -> tuple[int, str, float | None]:
        """One signed POST on the session; connection problems are raised as Refused."""
        if self._session is None:
            raise Refused("closed", "the transport was not started")
        headers = {**headers, **signed_headers(self._key, self.sensor, "POST", path, body,
                                               version=self.protocol_version,
                                               instance=self.instance)}
        try:
            async with self._session.post(self.url(path), data=body,
                                          headers=headers) as response:
                body = await read_bounded(response.content, MAX_ANSWER_BYTES)
                if body is None:
                    raise Refused("bad-answer", f"the vSensor's answer is larger than "
                                  f"{MAX_ANSWER_BYTES} bytes (not read)", None, response.status)
                text = self.without_key(body.decode(errors="replace"))
                return response.status, text, retry_after(response.headers.get("Retry-After"))
        except aiohttp.ServerFingerprintMismatch:
            raise Refused("tls", "the vSensor's certificate does not match the pinned "
                          "fingerprint") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Refused("tls", f"the vSensor's certificate is not trusted "
                          f"({exc.certificate_error})") from None
        except TimeoutError:
            raise Refused("timeout", f"no answer within {self.timeout_seconds:g} s") from None
        except aiohttp.ClientError as exc:
            raise Refused("unreachable", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise Refused("unreachable", f"{exc.strerror or exc}") from None

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON object; the answer's JSON object, or Refused."""
        status, text, wait = await self.post(path, json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
        log.log(level(2), "%s -> %d", path, status)
        if status != 200:
            reason = reason_of(text)
            if status == 426:
                reason = f"no common protocol version: {reason}"
            raise Refused(state_of(status), f"HTTP {status} ({reason})", wait, status)
        try:
            answer = json.loads(text)
        except ValueError:
            raise Refused("bad-answer", "the vSensor's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise Refused("bad-answer", "the vSensor's answer is not a JSON object")
        return answer

    async def post_chunk(self, body: bytes, headers: dict[str, str],
                         digest: tuple[str, str] | None) -> tuple[int, str, float | None]:
        """One signed chunk POST on the bulk connection's thread (see bulk.py for why)."""
        if self._bulk is None or self._bulk_thread is None:
            raise Refused("closed", "the transport was not started")
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(self._bulk_thread, self._signed_post, body,
                                                headers, digest)
        except BulkError as exc:
            raise Refused(exc.state, str(exc)) from None
        return answer.status, self.without_key(answer.text), retry_after(answer.retry_after)

    def _signed_post(self, body: bytes, headers: dict[str, str],
                     digest: tuple[str, str] | None) -> BulkAnswer:
        """Sign (hashing again only if the vSensor's digests changed) and POST; bulk thread."""
        assert self._bulk is not None
        algorithm = self.digest
        known = digest[1] if digest is not None and digest[0] == algorithm else None
        headers = {**headers, **signed_headers(self._key, self.sensor, "POST", PATH_CHUNKS, body,
                                               version=self.protocol_version,
                                               instance=self.instance, digest=known,
                                               algorithm=algorithm)}
        return self._bulk.post(PATH_CHUNKS, body, headers)
