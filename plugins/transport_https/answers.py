"""How the https transport reads the vSensor's answers and when it tries again."""

from __future__ import annotations

import json
import logging
import random
import time


class Backoff:
    """Exponential back-off with equal jitter: the n-th wait is drawn from [c/2, c] with
    c = min(maximum, minimum * 2**n), so sensors that lost the same vSensor do not retry in step
    and none retries faster than half the current step."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._ceiling = minimum

    def next(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt; ``Retry-After`` (capped at an hour) wins."""
        ceiling = self._ceiling
        self._ceiling = min(self._ceiling * 2, self.maximum)
        if retry_after is not None:
            return min(retry_after, 3600.0)
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
    """Seconds from a Retry-After header (a number; an HTTP date is rarely used by servers)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0)


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
