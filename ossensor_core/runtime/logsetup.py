"""Logging with the guide's debug levels.

``OSSENSOR_DEBUG`` n shows the messages of levels 0..n: 0 basic information, 1 capture and
Antigena counters, 2 what is sent and the answers, 3 Antigena detail, 4 a summary of each chunk,
5 every packet as hex. Level n maps to the logging level ``INFO - n``; warnings and errors always
show. The HMAC key is masked in every record, whatever a message contains.
"""

from __future__ import annotations

import logging
import sys

INFO = logging.INFO
LOGGER = "ossensor"


def level(n: int) -> int:
    """The logging level of the guide's debug level ``n`` (0-5)."""
    return logging.INFO - n


for _n in range(1, 6):
    logging.addLevelName(level(_n), f"DEBUG{_n}")


class SecretFilter(logging.Filter):
    """Replaces secrets in the formatted message; the secret never reaches a handler."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, "***")
                record.msg, record.args = message, None
        return True


def setup_logging(debug: int, path: str = "/dev/stdout", secrets: list[str] | None = None) -> None:
    """Send the ``ossensor`` loggers to ``path`` at the given debug level."""
    if path in ("/dev/stdout", "-", ""):
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    elif path == "/dev/stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretFilter(secrets or []))
    for name in (LOGGER, "ossensor_core", "ossensor_plugins"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level(debug))
        logger.propagate = False
