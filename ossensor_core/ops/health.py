"""Health of a running sensor, for exec probes: a status file written by the sensor, read by
``ossensor health``.

The running sensor rewrites ``health.json`` in the run folder (``OSSENSOR_RUN_DIR``, default the
folder of ``OSSENSOR_CONFIG_PATH``) every :data:`WRITE_SECONDS`, under a temporary name renamed
into place, so a reader never sees half a file. The write happens on the event loop: a fresh
file proves that the loop is turning, which is what a liveness probe needs to know, without a
port on the node's network (a DaemonSet runs on the host network, where ports collide).

``ossensor health`` (readiness, the default) passes when the file is fresh, its process is alive,
the transport is registered (transports without registration, such as ``file``, count as
registered) and at least one capture is open. ``ossensor health --live`` only checks that the
file is fresh and its process alive. The file holds no secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ossensor_core.pipeline.config import SensorConfig, read_core_config

if TYPE_CHECKING:
    from ossensor_core.pipeline.contracts import Transport
    from ossensor_core.pipeline.sensor import Sensor

log = logging.getLogger("ossensor.health")

STATUS_FILE = "health.json"
WRITE_SECONDS = 2.0
#: A status older than this means the sensor is stuck (or gone): several missed writes.
STALE_SECONDS = 30.0


def status_path(config: SensorConfig) -> Path:
    """Where the running sensor keeps its status file."""
    folder = Path(config.run_dir) if config.run_dir else config.config_path.parent
    return folder / STATUS_FILE


def transport_registered(transport: Transport) -> bool:
    """A transport that registers (https) says so in ``stats().registered``; others (None)
    have nothing to wait for."""
    return transport.stats().registered is not False


def snapshot(sensor: Sensor, state: str) -> dict[str, Any]:
    """What a probe needs: who wrote it, when, and whether the sensor is ready."""
    own = sensor.stats()
    return {"pid": os.getpid(), "sensor": sensor.config.name, "state": state,
            "updated": time.time(), "registered": transport_registered(sensor.transport),
            "capturing": sorted(own.interfaces), "chunks_sent": own.chunks_sent,
            "packets_sent": own.packets_sent, "unplaced": list(own.unplaced)}


def write_status(path: Path, status: Mapping[str, Any]) -> None:
    """Write ``status`` to ``path`` atomically (temporary file, then rename)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(status, handle)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


async def keep_status(sensor: Sensor, period: float = WRITE_SECONDS) -> None:
    """Rewrite the status file every ``period`` until cancelled, then mark it stopping (a
    stopping sensor is not ready). A folder that cannot be written is logged once per change:
    the probes then fail, which is the right signal."""
    path = status_path(sensor.config)
    failing = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        failing = f"cannot create the run folder {str(path.parent)!r}: {exc.strerror or exc}"
        log.error("health: %s; `ossensor health` will fail", failing)
    try:
        while True:
            try:
                await asyncio.to_thread(write_status, path, snapshot(sensor, "running"))
                if failing:
                    log.info("health: status file %s written again", path)
                failing = ""
            except OSError as exc:
                message = f"cannot write {str(path)!r}: {exc.strerror or exc}"
                if message != failing:
                    log.error("health: %s; `ossensor health` will fail", message)
                failing = message
            await asyncio.sleep(period)
    finally:
        with contextlib.suppress(OSError):
            write_status(path, snapshot(sensor, "stopping"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def check_status(path: Path, live_only: bool, max_age: float = STALE_SECONDS,
                 now: float | None = None) -> tuple[bool, str]:
    """Judge the status file: (healthy, one line saying why)."""
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"no status file {str(path)!r}: the sensor is not running (yet)"
    except (OSError, ValueError) as exc:
        return False, f"cannot read the status file {str(path)!r}: {exc}"
    age = (time.time() if now is None else now) - float(status.get("updated", 0))
    pid = int(status.get("pid", 0))
    if pid <= 0 or not _alive(pid):
        return False, f"the sensor process {pid} is gone"
    if age > max_age:
        return False, f"the status is {age:.0f} s old (limit {max_age:g} s): the sensor is stuck"
    if live_only:
        return True, f"alive: pid {pid}, status {age:.1f} s old"
    if status.get("state") != "running":
        return False, f"not ready: the sensor is {status.get('state')}"
    if not status.get("registered"):
        return False, "not ready: not registered with the vSensor yet"
    if not status.get("capturing"):
        return False, "not ready: no interface is being captured"
    return True, (f"ready: registered, capturing on {', '.join(status['capturing'])}, "
                  f"{status.get('chunks_sent', 0)} chunks sent")


def run_health(environ: Mapping[str, str], live_only: bool, max_age: float) -> tuple[int, str]:
    """``ossensor health``: exit code and message. Only the paths are read from the
    environment, so it works where required variables are missing (the message says so)."""
    config, _problems = read_core_config(environ)
    healthy, message = check_status(status_path(config), live_only, max_age)
    return (0 if healthy else 1), message
