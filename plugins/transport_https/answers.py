"""How the https transport reads the vSensor's answers and when it tries again."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from email.utils import parsedate_to_datetime

import aiohttp

#: ``Retry-After`` bounds: one second (the header's own unit; a load balancer's "0" or a date in
#: the past must not turn retries into a tight loop) to five minutes (a broken or hostile
#: server's 10^9 must not stall the queue for days; a vSensor that needs longer answers again).
RETRY_AFTER_FLOOR = 1.0
RETRY_AFTER_CAP = 300.0


class Backoff:
    """Exponential back-off with equal jitter: the n-th wait is drawn from [c/2, c] with
    c = min(maximum, minimum * 2**n), so sensors that lost the same vSensor do not retry in step
    and none retries faster than half the current step."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._ceiling = minimum

    def next(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt; ``Retry-After`` (already within
        [``RETRY_AFTER_FLOOR``, ``RETRY_AFTER_CAP``], see :func:`retry_after`) wins."""
        ceiling = self._ceiling
        self._ceiling = min(self._ceiling * 2, self.maximum)
        if retry_after is not None:
            return min(max(retry_after, RETRY_AFTER_FLOOR), RETRY_AFTER_CAP)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._ceiling = self.minimum


class Refused(Exception):
    """A request that did not succeed; ``state`` says which (for once-per-change logging)."""

    def __init__(self, state: str, message: str, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.state = state
        self.retry_after = retry_after
        self.status = status


def state_of(status: int) -> str:
    """The logging state of an HTTP status (one state per status)."""
    return f"{status}"


def reason_of(text: str) -> str:
    """The vSensor's reason (``{"error": ...}``), short; never our own key (we never send it)."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        text = str(answer["error"])
    elif isinstance(answer, dict) and "supported" in answer:
        text = f"the vSensor supports {answer['supported']}"
    text = " ".join(text.split())
    return text[:200] or "no reason given"


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header, strictly (RFC 9110: delta-seconds, digits only, or
    an HTTP date), within [``RETRY_AFTER_FLOOR``, ``RETRY_AFTER_CAP``]: 0, a negative number,
    NaN, a fraction, a date in the past or garbage give the floor (the server asked for a
    wait, just not a usable one: never a tight loop), anything longer than the cap the cap.
    None when there is no header."""
    if value is None:
        return None
    text = value.strip()[:64]
    if text.isascii() and text.isdigit():
        seconds = float(int(text[:12]))  # 12 digits are far beyond the cap already
    else:
        try:
            when = parsedate_to_datetime(text)
            seconds = when.timestamp() - time.time() if when.tzinfo is not None else 0.0
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = 0.0
    if not math.isfinite(seconds):
        seconds = 0.0
    return min(max(seconds, RETRY_AFTER_FLOOR), RETRY_AFTER_CAP)


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """An answer's body, or None when it is longer than ``limit`` (not read beyond it)."""
    body = b""
    while len(body) <= limit:
        more = await content.read(limit + 1 - len(body))
        if not more:
            return body
        body += more
    return None


class OnceLog:
    """Logs a topic's failure once per change of state, not once per attempt; "ok" after a
    failure is logged as a recovery. Failures are errors (heartbeats: warnings) unless
    ``severity`` says otherwise."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.states: dict[str, str] = {}

    def __call__(self, topic: str, state: str, message: str | None,
                 severity: int | None = None) -> None:
        previous = self.states.get(topic)
        if previous == state:
            return
        self.states[topic] = state
        if message is None:
            return
        if state == "ok":
            if previous is not None:
                self.log.info("%s", message)
        elif severity is not None:
            self.log.log(severity, "%s", message)
        elif topic == "heartbeat":
            self.log.warning("%s", message)
        else:
            self.log.error("%s", message)
