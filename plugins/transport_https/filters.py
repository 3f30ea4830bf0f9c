"""The vSensor's filter and peer ranges, applied to the sensor through ``SensorControl``.

The vSensor hands out a libpcap expression (its own traffic, and whatever it wants left out) and,
to sensors that said they take them, the address ranges other sensors store (the peer exclusion,
sent again only when their ``id`` changes).
"""

from __future__ import annotations

import logging
from typing import Any

from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.errors import FilterError
from ossensor_core.pipeline.contracts import SensorControl

log = logging.getLogger(__package__)  # one logger for the whole transport


class VSensorFilter:
    """The filter in force: ``expression`` and ``peers`` applied last, and the vSensor's id of
    those ranges."""

    def __init__(self) -> None:
        self.control: SensorControl | None = None  # set when the transport starts
        self.expression: str | None = None
        self.peers: AddressSet | None = None
        self.peers_id: str | None = None
        self._failed: tuple[str, AddressSet | None] | None = None

    def apply(self, expression: Any, peer_ranges: Any = None) -> None:
        """Apply the vSensor's expression and, when it sends them, its peer ranges; the
        previous filter stays when the new one fails."""
        if not isinstance(expression, str) or self.control is None:
            return
        expression = expression.strip()
        peers, peers_id = None, None
        if isinstance(peer_ranges, dict):
            peers_id = peer_ranges.get("id")
            if "ranges" in peer_ranges:
                try:
                    peers = AddressSet.parse(peer_ranges["ranges"])
                except (TypeError, ValueError) as exc:
                    log.error("the vSensor's peer ranges are malformed (keeping the current "
                              "filter): %s", exc)
                    return
            elif peers_id == self.peers_id:
                peers = self.peers
            else:  # a new id without its ranges: keep ours, ask again next time
                peers, peers_id = self.peers, None
        wanted = (expression, peers)
        if wanted == (self.expression, self.peers) or wanted == self._failed:
            self.peers_id = peers_id
            return
        try:
            # The note it returns is read again with each heartbeat (SensorControl.filter_note):
            # a capture of a new link type may change it.
            if peers is None or not len(peers):
                self.control.set_vsensor_filter(expression)
            else:
                self.control.set_vsensor_filter(expression, peers)
        except FilterError as exc:
            self._failed = wanted
            log.error("cannot apply the vSensor's filter %r (keeping %r): %s", expression,
                      self.expression or "", exc)
            return
        self._failed = None
        self.expression, self.peers, self.peers_id = expression, peers, peers_id
        log.info("applied the vSensor's filter %r%s", expression,
                 f" and peer exclusion {peers!r}" if peers is not None else "")
