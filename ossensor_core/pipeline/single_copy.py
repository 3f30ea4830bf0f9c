"""The single-copy rules in force on a running sensor, and how they follow the node.

``node/placement.py`` says which copy of a packet each interface keeps; this module keeps the
plan in force, places captures as they open, and computes the plan again after every burst of
link, address or route events (not on the heartbeat), swapping the filters so that a packet may
be stored twice while they change, never lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ossensor_core.capture.bpf import BpfProgram
from ossensor_core.errors import CaptureError, FilterError, InterfaceError
from ossensor_core.node.interfaces import Interface
from ossensor_core.node.placement import Plan, Rules, node_changes, plan, read_node_view
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.runtime.logsetup import level
from ossensor_core.wire.names import LINKTYPE_ETHERNET

if TYPE_CHECKING:
    from ossensor_core.pipeline.sensor import Sensor

log = logging.getLogger("ossensor.sensor")


class SingleCopy:
    """The plan in force (start-up's, then the node's as it changes)."""

    def __init__(self, config: SensorConfig, initial: Plan) -> None:
        self.active = config.single_copy_active
        self.rules = Rules(config.service_ranges, config.pod_copy, config.keep_encapsulated)
        self.plan = initial
        self.wake = asyncio.Event()  # a change to place: set by netlink events and by captures

    def opening(self, interface: Interface) -> str:
        """The rule for a capture that opens now; an interface the plan does not know yet keeps
        every copy, and the plan is computed again at once."""
        if self.active and interface.index not in self.plan.placements:
            self.wake.set()
        return self.plan.expression(interface.index)

    async def follow(self, sensor: Sensor) -> None:
        """Place the interfaces again after every burst of link, address or route events."""
        try:
            async for _ in node_changes(self.wake):
                try:
                    view = await asyncio.to_thread(read_node_view)
                except InterfaceError as exc:
                    log.error("single copy: %s; the filters stay as they are", exc)
                    continue
                await self.apply(sensor, plan(view, self.rules))
        except InterfaceError as exc:
            log.error("single copy: %s; the filters no longer follow the node", exc)

    async def apply(self, sensor: Sensor, new: Plan) -> None:
        """Swap every capture whose rule changes to its new rule. The programs are compiled in a
        thread; then each capture that changes keeps every copy, and only after all of them do,
        each takes its new rule: between the two steps a packet may be stored twice, never
        lost (a capture that narrows before another widens could lose it)."""
        captures = sensor.captures
        vsensor = sensor.vsensor_filter, sensor.vsensor_peers
        changing = {i: (c.source.interface, c.placement, new.expression(i))
                    for i, c in captures.items() if c.placement != new.expression(i)}

        def compile_all() -> dict[int, tuple[BpfProgram | None, BpfProgram]]:
            built = {}
            for index, (interface, old, rule) in changing.items():
                linktype = interface.linktype or LINKTYPE_ETHERNET
                wide = sensor.build(linktype, "", *vsensor)[0] if old else None
                built[index] = (wide, sensor.build(linktype, rule, *vsensor)[0])
            return built

        try:
            programs = await asyncio.to_thread(compile_all)
        except FilterError as exc:
            log.error("single copy: the new filters do not compile, the old ones stay: %s", exc)
            return
        if (sensor.vsensor_filter, sensor.vsensor_peers) != vsensor:
            self.wake.set()  # the vSensor's filter changed meanwhile: again, with it
            return
        present = [i for i in programs if i in captures]
        try:
            for index in present:
                wide = programs[index][0]
                if wide is not None:
                    captures[index].source.set_filter(wide)
                    captures[index].placement = ""
            for index in present:
                captures[index].source.set_filter(programs[index][1])
                captures[index].placement = changing[index][2]
        except (CaptureError, FilterError) as exc:
            log.error("single copy: cannot swap a filter: %s", exc)
            self.wake.set()
        old_unplaced = {p.name for p in self.plan.unplaced()}
        self.plan = new
        for note in new.notes():
            if note.split(":", 1)[0] not in old_unplaced:
                log.warning("single copy: %s", note)
        if present:
            log.log(level(1), "single copy: new rules on %s", ", ".join(
                f"{captures[i].source.interface.name} ({new.placements[i].role})"
                if i in new.placements else captures[i].source.interface.name
                for i in present))
        if any(c.placement != new.expression(i) for i, c in captures.items()):
            self.wake.set()  # a capture opened meanwhile with the rules before
