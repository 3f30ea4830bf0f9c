"""Antigena across replicas: actions in force in ``ossensor-actions``, reports counted once.

In cluster mode the actions in force live in the bucket (key: the action's id, value: what
:meth:`~ossensor_core.wire.antigena.BlockAction.as_json` writes), replicated by JetStream,
instead of ``DATA_DIR/.antigena-actions.json``: they survive the restart of any replica and of
the whole cluster. A change the operator makes on one replica is written there first (``503
actions_not_saved`` when NATS does not take it, nothing changed); every replica follows the
bucket and pushes what changed to the sensors connected to it, so an action issued anywhere
reaches every sensor within the watch's delay (milliseconds). A value read back is parsed by
``BlockAction.from_json`` as strictly as an action from the network, and its key must be its
id; anything else is skipped with one bounded line. Expired actions are deleted from the bucket
by whichever replica notices first (a sensor expires them itself, so nobody pushes a clear).

Reports: a sensor's report ``seq`` is counted by the replica that first creates the key
``<token>.<seq>`` in ``ossensor-reports``; a resend to another replica (after a lost ack or a
reconnect) is acknowledged there but not counted again, so the per-replica totals add up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ossensor_core.wire.antigena import BlockAction

from . import names
from .registry import ClusterUnavailable
from .watch import BucketWatch

log = logging.getLogger("ossensor_vsensor.cluster")

BUCKET = "ossensor-actions"
REPORTS = "ossensor-reports"
#: An action is a few hundred bytes.
MAX_ACTION_BYTES = 4096
#: Actions mirrored at most (the operator API caps them per sensor; this bounds the bucket).
MAX_ACTIONS = 20_000
TIMEOUT_SECONDS = 5.0


def parse_action(key: str, value: bytes, now: float) -> BlockAction:
    """An action read from the bucket; ValueError names what is wrong."""
    if len(value) > MAX_ACTION_BYTES:
        raise ValueError(f"{len(value)} bytes, over {MAX_ACTION_BYTES}")
    from ..registration import json_object  # the same JSON rules as a sensor's body

    action = BlockAction.from_json(json_object(value), now, targeted=True)
    if action.id != key:
        raise ValueError(f"the action's id {action.id[:100]!r} is not its key")
    return action


def expired(value: bytes, now: float) -> bool:
    """Whether ``value`` is an action (as far as its expiry shows) that expired by ``now``."""
    if len(value) > MAX_ACTION_BYTES:
        return False
    from ..registration import json_object

    try:
        expiry = json_object(value).get("expiry")
    except ValueError:
        return False
    return isinstance(expiry, (int, float)) and not isinstance(expiry, bool) and expiry <= now


class SharedActions:
    """This replica's side of ``ossensor-actions`` and ``ossensor-reports``.

    ``actions``: the hub's dict of actions in force, changed in place as the bucket changes;
    ``push(message, sensor)``: sends a message to the sensors connected here."""

    def __init__(self, kv: Any, reports: Any, actions: dict[str, BlockAction],
                 now: Callable[[], float],
                 push: Callable[[dict[str, Any], str | None], Awaitable[None]],
                 js: Any = None) -> None:
        self.kv = kv
        self.reports = reports
        self.actions = actions
        self.now = now
        self.push = push
        self.watch = BucketWatch(kv, BUCKET, self._on_entry, MAX_ACTION_BYTES, js)
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self, wait: float = 10.0) -> None:
        """Follow the bucket; wait (up to ``wait`` s) until the actions in force are read."""
        self.watch.start()
        try:
            await asyncio.wait_for(self.watch.ready.wait(), wait)
        except TimeoutError:
            log.warning("NATS: %s not read within %g s: starting with what came", BUCKET, wait)
        log.info("%d Antigena actions in force read from %s", len(self.actions), BUCKET)

    async def stop(self) -> None:
        await self.watch.stop()
        for task in list(self._background):
            task.cancel()

    async def _on_entry(self, key: str, value: bytes | None, revision: int) -> None:
        now = self.now()
        if value is None:
            gone = self.actions.pop(key, None)
            if gone is not None and gone.expiry > now:
                log.info("Antigena action %s cleared (on another replica)", key[:100])
                await self.push({"type": "clear", "id": gone.id}, gone.sensor)
            return
        if expired(value, now):  # the sensors expire it themselves: no push, just tidy up
            self.actions.pop(key, None)
            self.forget([key])
            return
        action = parse_action(key, value, now)
        if action.id not in self.actions and len(self.actions) >= MAX_ACTIONS:
            raise ValueError(f"{MAX_ACTIONS} actions in force already")
        if self.actions.get(action.id) == action:
            return  # written here, or read again after a restart of the watch
        self.actions[action.id] = action
        log.info("Antigena action %s: block %s on %s (from the shared bucket)", action.id,
                 action.describe(), action.sensor or "every sensor")
        await self.push({"type": "action", "action": action.as_json()}, action.sensor)

    async def save(self, old: dict[str, BlockAction], new: dict[str, BlockAction]) -> None:
        """Write what differs between ``old`` and ``new`` (actions in force); raises
        ClusterUnavailable when JetStream does not take it all."""
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                for action_id, action in new.items():
                    if old.get(action_id) != action:
                        await self.kv.put(action_id, json.dumps(action.as_json()).encode())
                for action_id in old.keys() - new.keys():
                    await self.kv.delete(action_id)
        except Exception as exc:
            raise ClusterUnavailable(str(exc)[:200] or type(exc).__name__) from None

    def forget(self, expired: list[str]) -> None:
        """Delete expired actions from the bucket, in the background (best effort)."""
        async def delete() -> None:
            for action_id in expired:
                with contextlib.suppress(Exception):
                    await self.kv.delete(action_id)

        if expired:
            task = asyncio.get_running_loop().create_task(delete())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def first_report(self, sensor: str, sequence: int) -> bool:
        """Whether this replica is the first to count report ``sequence`` of ``sensor``;
        ClusterUnavailable when NATS does not answer (the report is then not acknowledged,
        and the sensor sends it again)."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                await self.reports.create(f"{names.token(sensor)}.{sequence}", b"")
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:
            raise ClusterUnavailable(str(exc)[:200] or type(exc).__name__) from None
        return True
