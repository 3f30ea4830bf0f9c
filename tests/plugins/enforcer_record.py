"""A second Antigena enforcer, as a third-party package would ship one: it records each blocked
segment handed to it (action id, interface, packets) in a file instead of acting on it.

Entry point (group ``ossensor.plugins``): ``record = "tests.plugins.enforcer_record"``; its file
comes from ``OSSENSOR_RECORD_PATH``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ossensor_core.plugin import PacketBatch, Setting, SettingsGroup, hookimpl


class RecordingEnforcer:
    name = "record"

    def __init__(self, path: str) -> None:
        self.path = path

    def enforce(self, batch: PacketBatch, actions: Sequence[object]) -> int:
        with open(self.path, "a") as out:
            for action in actions:
                out.write(f"{getattr(action, 'id', '?')} {batch.interface} {batch.count}\n")
        return batch.count


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("record", [Setting("path", str, "", "File that records blocked "
                                                             "segments.", required=True)])


@hookimpl
def ossensor_response_enforcer(config) -> RecordingEnforcer:
    return RecordingEnforcer(config.plugin("record").path)
