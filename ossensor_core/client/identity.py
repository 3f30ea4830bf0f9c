"""Who this sensor process is to the vSensor: its instance id and its registration body.

The vSensor keeps the last registration of each sensor, so everything that registers (the https
transport, and ``ossensor diagnose`` with ``"probe": true``) builds the body here.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ossensor_core import __version__
from ossensor_core.node.interfaces import Interface
from ossensor_core.wire.names import PROTOCOL_VERSIONS

log = logging.getLogger(__name__)

#: The file in the spool folder that keeps the instance id across restarts.
INSTANCE_FILE = "instance-id"
TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o600
#: What the sensor tells the vSensor it understands (``docs/protocol.md``).
FEATURES = ("peer-ranges", "filter-refresh")
_INSTANCE = re.compile(r"^[0-9a-f]{32}$")


def new_instance() -> str:
    """A fresh instance id (a uuid4 in hex)."""
    return uuid.uuid4().hex


def read_instance(folder: Path) -> str | None:
    """The instance id kept in ``folder``, or None when there is none (read only)."""
    try:
        kept = (folder / INSTANCE_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return kept if _INSTANCE.match(kept) else None


def load_instance(folder: Path) -> str:
    """The instance id kept in ``folder``, created on first use; a fresh one for this process
    (with a warning) when the file cannot be read or written."""
    path = folder / INSTANCE_FILE
    try:
        kept = path.read_text(encoding="ascii").strip()
        if _INSTANCE.match(kept):
            return kept
        log.warning("%s does not hold an instance id; making a new one", path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s (%s); making a new instance id", path, exc)
    instance = new_instance()
    temporary = path.with_name(INSTANCE_FILE + TEMP_SUFFIX)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(instance + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot keep the instance id in %s (%s); it lasts for this process only",
                    path, exc.strerror or exc)
    return instance


def routable_addresses(interfaces: Sequence[Interface]) -> list[str]:
    """The routable addresses of ``interfaces``, each once, in order."""
    addresses: list[str] = []
    for interface in interfaces:
        for address in interface.routable_addresses:
            if address not in addresses:
                addresses.append(address)
    return addresses


def registration_body(sensor: str, instance: str, interfaces: Sequence[Interface], *,
                      workloads: Sequence[str] = (), primary_address: str | None = None,
                      probe: bool = False) -> dict[str, Any]:
    """The JSON body of a registration; ``probe`` asks the vSensor to verify and answer it
    without recording anything (``ossensor diagnose``)."""
    body: dict[str, Any] = {
        "sensor": sensor, "versions": list(PROTOCOL_VERSIONS),
        "software": f"ossensor {__version__}", "instance": instance,
        "addresses": routable_addresses(interfaces), "interfaces": [i.name for i in interfaces],
        "workloads": list(workloads), "features": list(FEATURES)}
    if primary_address is not None:
        body["primary_address"] = primary_address
    if probe:
        body["probe"] = True
    return body
