"""The vSensor's filter and peer ranges, applied to the sensor through ``SensorControl``.

The vSensor hands out a libpcap expression (its own traffic, and whatever it wants left out) and,
to sensors that said they take them, the address ranges other sensors store (the peer exclusion,
sent again only when their ``id`` changes).

Under it, from the transport's start, the sensor leaves out its own traffic to the vSensor it
is configured with (:meth:`VSensorFilter.set_own`): the first registration goes out before any
filter has come back, and a load balancer's address in front of several vSensors is known to
none of them (a replica sees its own address, and the balancer's only when a PROXY header
names it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any

from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.errors import FilterError
from ossensor_core.pipeline.contracts import SensorControl
from ossensor_core.wire.names import (MAX_FILTER_CHARS, MAX_PEER_RANGE_CHARS, MAX_PEER_RANGES,
                                     MAX_PEER_RANGES_ID_CHARS)

log = logging.getLogger(__package__)  # one logger for the whole transport


class VSensorFilter:
    """The filter in force: ``expression`` and ``peers`` applied last, and the vSensor's id of
    those ranges; ``refused`` says why the vSensor's latest filter is not (for the heartbeat's
    ``filter_note``: the vSensor shows it)."""

    def __init__(self) -> None:
        self.control: SensorControl | None = None  # set when the transport starts
        self.expression: str | None = None
        self.peers: AddressSet | None = None
        self.peers_id: str | None = None
        self.refused = ""
        self._failed: tuple[str, AddressSet | None] | None = None
        self._failed_id: str | None = None
        #: The sensor's own exclusion of its configured vSensor endpoint, ANDed with
        #: ``expression`` ("" until the transport resolved it).
        self.own = ""

    def set_own(self, own: str) -> None:
        """Leave out traffic to the configured vSensor (``own``: a libpcap expression) from now
        on: alone until the vSensor's filter comes, and under every filter it sends."""
        if own == self.own:
            return
        self.own = own
        if self.control is None:
            return
        try:
            if self.peers is None or not len(self.peers):
                self.control.set_vsensor_filter(self._with_own(self.expression or ""))
            else:
                self.control.set_vsensor_filter(self._with_own(self.expression or ""),
                                                self.peers)
        except FilterError as exc:  # a host name's address we cannot compile: go without it
            log.error("cannot leave out the traffic to the vSensor (%s): %s", own[:200], exc)
            self.own = ""
            return
        log.info("left out the traffic to the configured vSensor: %s", own)

    def _with_own(self, expression: str) -> str:
        return " and ".join(p for p in (self.own, expression) if p)

    def _refuse(self, reason: str) -> None:
        """Keep the filter in force, log once per reason and report it with the heartbeats."""
        note = f"cannot apply the vSensor's filter, refused whole{reason}"[:300]
        if note != self.refused:
            log.error("%s", note)
        self.refused = note

    def apply(self, expression: Any, peer_ranges: Any = None) -> None:
        """Apply the vSensor's expression and, when it sends them, its peer ranges, all or
        nothing: anything out of bounds or that does not compile keeps the previous filter."""
        if self.control is None:
            return
        if not isinstance(expression, str):
            if expression is not None:
                self._refuse(f": 'filter' is a {type(expression).__name__}, not a string")
            return
        if len(expression) > MAX_FILTER_CHARS:
            self._refuse(f": 'filter' has {len(expression)} characters (at most "
                         f"{MAX_FILTER_CHARS})")
            return
        expression = expression.strip()
        peers, peers_id = None, None
        if peer_ranges is not None:
            try:
                ranges, peers_id = _checked_ranges(peer_ranges)
                peers = AddressSet.parse(ranges) if ranges is not None else None
            except ValueError as exc:
                self._refuse(f": malformed peer ranges: {exc}")
                return
            if ranges is None:
                if peers_id is not None and self._failed is not None \
                        and peers_id == self._failed_id:  # still the set refused before
                    peers = self._failed[1]
                elif peers_id == self.peers_id:
                    peers = self.peers
                else:  # a new id without its ranges: keep ours, ask again next time
                    peers, peers_id = self.peers, None
        wanted = (expression, peers)
        if wanted == (self.expression, self.peers) or wanted == self._failed:
            if wanted != self._failed:
                self.refused = ""
            self.peers_id = peers_id
            return
        try:
            # The note it returns is read again with each heartbeat (SensorControl.filter_note):
            # a capture of a new link type may change it.
            if peers is None or not len(peers):
                self.control.set_vsensor_filter(self._with_own(expression))
            else:
                self.control.set_vsensor_filter(self._with_own(expression), peers)
        except FilterError as exc:
            self._failed, self._failed_id = wanted, peers_id
            self._refuse(f": {expression[:100]!r} (keeping {(self.expression or '')[:100]!r}): "
                         f"{exc}")
            return
        self._failed = None
        self.refused = ""
        self.expression, self.peers, self.peers_id = expression, peers, peers_id
        log.info("applied the vSensor's filter %r%s", expression,
                 f" and peer exclusion {peers!r}" if peers is not None else "")


def _checked_ranges(peer_ranges: Any) -> tuple[list[str] | None, str | None]:
    """The ranges (None when not sent) and the id of a ``peer_ranges`` object, within the
    bounds of ``wire/names.py``; ValueError says what is wrong."""
    if not isinstance(peer_ranges, dict):
        raise ValueError(f"not an object but a {type(peer_ranges).__name__}")
    peers_id = peer_ranges.get("id")
    if peers_id is not None and (not isinstance(peers_id, str)
                                 or len(peers_id) > MAX_PEER_RANGES_ID_CHARS):
        raise ValueError(f"the id is not a string of at most {MAX_PEER_RANGES_ID_CHARS} "
                         "characters")
    if "ranges" not in peer_ranges:
        return None, peers_id
    ranges = peer_ranges["ranges"]
    if not isinstance(ranges, list):
        raise ValueError(f"'ranges' is a {type(ranges).__name__}, not a list")
    if len(ranges) > MAX_PEER_RANGES:
        raise ValueError(f"{len(ranges)} ranges (at most {MAX_PEER_RANGES})")
    for text in ranges:
        if not isinstance(text, str) or not 0 < len(text) <= MAX_PEER_RANGE_CHARS:
            raise ValueError(f"the range {str(text)[:40]!r} is not a string of 1 to "
                             f"{MAX_PEER_RANGE_CHARS} characters")
    return ranges, peers_id


async def own_exclusion(host: str, port: int, timeout: float = 5.0) -> str:
    """``not (host A and tcp port P)`` for every address ``host`` resolves to (at most 16);
    "" when it does not resolve in time (the vSensor's own filter still comes with the
    registration)."""
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot resolve %s to leave out the traffic to it before the "
                        "vSensor's filter comes: %s", host, exc)
            return ""
        addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    return " and ".join(f"not (host {a} and tcp port {port})" for a in addresses[:16])
