"""Antigena actions in force, kept on disk so that a restarted vSensor enforces them again.

``DATA_DIR/.antigena-actions.json`` holds every action in force (id, networks, ports, start,
expiry, target sensor: what :meth:`~ossensor_core.wire.antigena.BlockAction.as_json` writes).
It is rewritten after each change the operator makes (block, extend, clear) through a temporary
file, ``fsync`` and a rename, so a crash leaves the old file or the new one, never half of
one. A block silently lifted by a restart is worse than a refused request: when the file cannot
be written, the operator's request fails (``503``) and the change is not made.

At start the file is read (at most :data:`MAX_FILE_BYTES`), each action checked as strictly as
one that arrives over the network, expired ones dropped. A file that is not ours (not JSON, an
unknown version, an action that does not parse) stops start-up with one line naming the file:
the operator decides (move it aside to start without the actions), the vSensor does not guess.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ossensor_core.wire.antigena import BlockAction

log = logging.getLogger("ossensor_vsensor.antigena")

ACTIONS_FILE = ".antigena-actions.json"
FORMAT_VERSION = 1
#: Far above what the caps allow (40 actions per sensor, a few hundred bytes each, for
#: thousands of sensors); a larger file is not ours.
MAX_FILE_BYTES = 64 << 20


class ActionFileError(Exception):
    """The actions file cannot be read or written; the message names the file."""


class ActionFile:
    """The file of actions in force of one vSensor's data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / ACTIONS_FILE

    def load(self, now: float) -> list[BlockAction]:
        """The actions still in force at ``now``; ActionFileError for a file that is not
        ours."""
        try:
            with open(self.path, "rb") as source:
                raw = source.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ActionFileError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if len(raw) > MAX_FILE_BYTES:
            raise ActionFileError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes: not an "
                                  "actions file of this vSensor (move it aside)")
        try:
            document = json.loads(raw, parse_constant=_no_constant)
        except ValueError as exc:
            raise ActionFileError(f"{self.path}: not JSON ({exc}): move it aside to start "
                                  "without the actions it held") from None
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION \
                or not isinstance(document.get("actions"), list):
            raise ActionFileError(f"{self.path}: not an actions file of version "
                                  f"{FORMAT_VERSION} (move it aside)")
        kept, expired = [], 0
        for index, item in enumerate(document["actions"]):
            if isinstance(item, dict) and isinstance(item.get("expiry"), (int, float)) \
                    and not isinstance(item.get("expiry"), bool) and item["expiry"] <= now:
                expired += 1
                continue
            try:
                kept.append(BlockAction.from_json(item, now, targeted=True))
            except ValueError as exc:
                raise ActionFileError(f"{self.path}: action {index + 1}: {exc} (move the file "
                                      "aside to start without its actions)") from None
        log.info("%d Antigena actions in force loaded from %s%s", len(kept), self.path,
                 f" ({expired} expired while the vSensor was stopped)" if expired else "")
        return kept

    def save(self, actions: Iterable[BlockAction]) -> None:
        """Replace the file with ``actions``, durably; ActionFileError if that fails (the
        old file is then intact)."""
        body = json.dumps({"version": FORMAT_VERSION,
                           "actions": [a.as_json() for a in actions]}, indent=1).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise ActionFileError(f"{self.path}: cannot write ({exc.strerror or exc})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")
