"""The peer exclusion: the vSensor's ranges, the generated BPF, checked by the kernel itself.

The kernel is the oracle (``tests/helpers/bpf_oracle.py``): a process in a test namespace
attaches each program to a real AF_PACKET socket and reports which test packets it received.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ossensor_core.capture.bpf import (BPF_MAXINSNS, LINKTYPE_ETHERNET, LINKTYPE_RAW,
                                       combine_filters, compile_filter)
from ossensor_core.capture.bounded import bounded_and
from ossensor_core.capture.peer_exclusion import AddressSet, exclusion_code, lower_address_excluded, with_exclusion
from ossensor_core.errors import FilterError
from ossensor_core.node.workloads import Route, workload_ranges
from ossensor_vsensor.filters import (build_filter, claimed_once, claimed_set, peer_set,
                                      peers_expression, self_expression)
from tests.helpers.own_filter import vsensor_parts
from tests.helpers.traffic import udp4_packet, udp6_packet
from tests.helpers.bpf_oracle import MARK, Kernel, kernel_oracle


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    yield from kernel_oracle()


# -- test packets --------------------------------------------------------------------------------

def _payload(index: int) -> bytes:
    return MARK + index.to_bytes(4, "big")


def ip_packet(src: str, dst: str, index: int, port: int = 7000) -> bytes:
    if ":" in src:
        return udp6_packet(src, dst, 40000, port, _payload(index))
    return udp4_packet(src, dst, 40000, port, _payload(index), index)


def frame(packet: bytes, tags: tuple[int, ...] = ()) -> bytes:
    """Ethernet around ``packet``; ``tags``: TPIDs of VLAN tags, outer first (the receiving
    kernel takes the outer one off, as hardware would)."""
    ethertype = b"\x86\xdd" if packet[0] >> 4 == 6 else b"\x08\x00"
    head = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"
    return head + b"".join(struct.pack("!HH", t, 100 + n) for n, t in enumerate(tags)) + \
        ethertype + packet


def pair_around(peers: AddressSet, rng: random.Random, version: int) -> tuple[str, str]:
    """Two addresses, each at an interval edge or random: where off-by-one errors live."""
    intervals = peers.v4 if version == 4 else peers.v6
    top = (1 << 32) - 1 if version == 4 else (1 << 128) - 1
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address

    def one() -> int:
        if intervals and rng.random() < 0.8:
            first, last = rng.choice(intervals)
            return min(top, max(0, rng.choice([first - 1, first, last, last + 1,
                                               rng.randint(first, last)])))
        return rng.randint(0, top)
    return str(make(one())), str(make(one()))


def check(kernel: Kernel, peers: AddressSet, linktype: int, pairs: list[tuple[str, str]],
          user: str = "", tags: tuple[int, ...] = (), legacy: bool = False) -> None:
    """The kernel keeps exactly what the rule (and the user's expression) keeps; ``legacy``:
    the rule as the libpcap expression older sensors get, instead of generated code."""
    if legacy:
        program = compile_filter(combine_filters(peers_expression(peers), user), linktype)
    else:
        program = with_exclusion(peers, compile_filter(user, linktype))
    user_port = 9 if user else None
    frames, expected = [], set()
    for i, (src, dst) in enumerate(pairs):
        port = 9 if i % 4 == 3 else 7000
        packet = ip_packet(src, dst, i, port)
        frames.append(packet if linktype == LINKTYPE_RAW else frame(packet, tags))
        if not lower_address_excluded(peers, src, dst) and (user_port is None or port != 9):
            expected.add(i)
    assert kernel.accepted(program, frames) == expected


# -- tests -----------------------------------------------------------------------------------------


def test_generated_program_agrees_with_the_rule_in_the_kernel(kernel):
    rng = random.Random(5)
    peers = AddressSet.parse(["192.0.2.16/28", "192.0.2.40", "198.51.100.0-198.51.100.77",
                              "2001:db8::/64", "2001:db8:1::5", "2001:db8:2::-2001:db8:2::1:3"])
    pairs = [("192.0.2.17", "192.0.2.200"), ("192.0.2.200", "192.0.2.17"),  # one flow
             ("192.0.2.1", "192.0.2.17"), ("192.0.2.40", "192.0.2.41"),
             ("2001:db8::9", "2001:db8:5::1"), ("2001:db8:5::1", "2001:db8::9"),
             ("2001:db8:1::5", "2001:db8:1::5")]
    pairs += [pair_around(peers, rng, 4) for _ in range(60)]
    pairs += [pair_around(peers, rng, 6) for _ in range(60)]
    rng.shuffle(pairs)
    check(kernel, peers, LINKTYPE_ETHERNET, pairs)
    # With the user's program after it (its own jumps untouched): port 9 is dropped by it.
    check(kernel, peers, LINKTYPE_ETHERNET, pairs, user="not udp port 9")
    # An inner 802.1Q tag left in the data (802.1ad outside, taken off by the kernel).
    check(kernel, peers, LINKTYPE_ETHERNET, pairs, tags=(0x88A8, 0x8100))
    check(kernel, peers, LINKTYPE_ETHERNET, pairs, tags=(0x8100,))
    check(kernel, peers, LINKTYPE_RAW, pairs)
    check(kernel, peers, LINKTYPE_RAW, pairs, user="not udp port 9")
    # Older sensors: the same rule as a libpcap expression.
    check(kernel, peers, LINKTYPE_ETHERNET, pairs, user="not udp port 9", legacy=True)


def test_large_sets_need_long_jumps_and_still_agree(kernel):
    """Thousands of intervals: the search is cut into regions joined by ``ja``."""
    rng = random.Random(7)
    v4 = sorted(rng.sample(range(1 << 24), 1500))
    v6 = sorted(rng.getrandbits(64) for _ in range(80))
    peers = AddressSet([(0x0A000000 + 4 * x, 0x0A000000 + 4 * x + rng.randint(0, 2)) for x in v4],
                       [((0x20010DB8 << 96) + x, (0x20010DB8 << 96) + x + rng.randint(0, 9))
                        for x in v6])
    program = with_exclusion(peers, compile_filter("", LINKTYPE_ETHERNET))
    assert 2 * len(peers) < len(program) <= BPF_MAXINSNS
    pairs = [pair_around(peers, rng, 4 if i % 3 else 6) for i in range(600)]
    check(kernel, peers, LINKTYPE_ETHERNET, pairs)


_v4 = st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, 300))
_PREFIX = 0x20010DB8 << 96
# IPv6 anywhere, or sharing a /64 or a /96 (a node subnet): the search then decides on the later
# words alone, and a cell may be partly covered at any word.
_v6 = st.one_of(st.tuples(st.integers(0, (1 << 128) - 1), st.integers(0, 1 << 70)),
                st.tuples(st.integers(0, (1 << 64) - 1).map(lambda x: _PREFIX + x),
                          st.integers(0, 1 << 40)),
                st.tuples(st.integers(0, (1 << 32) - 1).map(lambda x: _PREFIX + x),
                          st.integers(0, 300)))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(v4=st.lists(_v4, max_size=120), v6=st.lists(_v6, max_size=40),
       seed=st.integers(0, 1 << 30), raw=st.booleans())
def test_membership_equals_ipaddress_membership(kernel, v4, v6, seed, raw):
    """Random sets: what the kernel drops is exactly what ``ipaddress`` says is excluded."""
    peers = AddressSet([(a, min(a + n, (1 << 32) - 1)) for a, n in v4],
                       [(a, min(a + n, (1 << 128) - 1)) for a, n in v6])
    rng = random.Random(seed)
    pairs = [pair_around(peers, rng, 4 if i % 2 else 6) for i in range(40)]
    for src, dst in pairs:  # the Python rule itself, against ipaddress (no AddressSet)
        low = min(ipaddress.ip_address(src), ipaddress.ip_address(dst))
        nets = peers.v4 if low.version == 4 else peers.v6
        assert lower_address_excluded(peers, src, dst) == any(a <= int(low) <= b
                                                              for a, b in nets)
    check(kernel, peers, LINKTYPE_RAW if raw else LINKTYPE_ETHERNET, pairs)


def cluster(sensors: int = 5000, seed: int = 1) -> list[AddressSet]:
    """What 5,000 sensors claim. Nodes: addresses of a node subnet taken in order, with other
    hosts in between (one in 20); pods: a /24 each from the cluster CIDR in order, with holes
    left by removed nodes (3 %); every fifth node is dual-stack (an IPv6 address with gaps, and
    an IPv6 pod /80 in order)."""
    rng = random.Random(seed)
    node, pod, node6, pods6 = 0x0A100001, 0, (0x20010DB8_0001 << 80) + 1, 0
    claims = []
    for i in range(sensors):
        while rng.random() < 0.05:
            node += 1
        while rng.random() < 0.03:
            pod += 1
        addresses = [str(ipaddress.IPv4Address(node))]
        workloads = [f"{ipaddress.IPv4Address(0x0A800000 + pod * 256)}/24"]
        if i % 5 == 0:
            while rng.random() < 0.05:
                node6 += 1
            addresses.append(str(ipaddress.IPv6Address(node6)))
            workloads.append(f"{ipaddress.IPv6Address((0x20010DB8_0100 << 80) + (pods6 << 48))}/80")
            node6, pods6 = node6 + 1, pods6 + 1
        node, pod = node + 1, pod + 1
        claims.append(claimed_set(addresses, workloads))
    return claims


def test_a_5000_sensor_cluster_fits_and_is_generated_in_well_under_a_second():
    claims = cluster()
    started = time.perf_counter()
    once = claimed_once(claims)  # the vSensor, once per change of the registry
    registry_seconds = time.perf_counter() - started
    user = compile_filter("not (host 192.0.2.1 and tcp port 443) and not port 53",
                          LINKTYPE_ETHERNET)
    worst = (0, 0.0)
    for index in (0, 1, 2500, 4998, 4999):
        started = time.perf_counter()
        peers = peer_set(claims[index], once)  # the vSensor, per sensor
        texts = peers.texts()  # what goes over the wire
        program = with_exclusion(AddressSet.parse(texts), user)  # the sensor
        seconds = time.perf_counter() - started
        assert len(program) <= BPF_MAXINSNS
        assert seconds < 1.0
        worst = max(worst, (len(program), seconds))
        assert not any(lower_address_excluded(peers, a, a) for a in _own(claims[index]))
    print(f"\n5,000 sensors: {once.summary()} claimed once, registry sweep "
          f"{registry_seconds * 1000:.0f} ms; per sensor at most {worst[0]} instructions "
          f"(limit {BPF_MAXINSNS}), {worst[1] * 1000:.0f} ms from ranges to program")


def _own(claim: AddressSet) -> list[str]:
    return [str(ipaddress.ip_address(a)) for a, _ in claim.v4 + claim.v6]


def test_beyond_the_limit_the_caller_gets_an_error_with_the_numbers():
    rng = random.Random(3)
    peers = AddressSet([(x, x) for x in sorted(rng.sample(range(1 << 32), 2500))])
    with pytest.raises(FilterError, match=r"2500 IPv4 .* more than the kernel's limit of 4096"):
        with_exclusion(peers, compile_filter("", LINKTYPE_ETHERNET))
    with pytest.raises(FilterError, match="link type 147"):
        exclusion_code(peers, 147)


def test_the_sensor_falls_back_to_the_rest_of_its_filter_when_the_peers_do_not_fit(caplog):
    """Never a blind sensor: without room for the peer part it keeps the rest (duplicates)."""
    from types import SimpleNamespace

    from ossensor_core.pipeline.sensor import Sensor

    sensor = Sensor.__new__(Sensor)  # only the filter state: no captures, no plugins
    sensor.prepared = SimpleNamespace(kernel_filter="not port 53")
    sensor.captures, sensor.vsensor_filter, sensor.vsensor_peers = {}, "", None
    sensor.filter_notes = {}
    small = AddressSet.parse(["192.0.2.2", "198.51.100.16/28"])
    assert sensor.set_vsensor_filter("not (host 192.0.2.254 and tcp port 8443)", small) == ""
    program = sensor.program(LINKTYPE_ETHERNET)
    assert program.expression.startswith("(not lower address in peers [2 IPv4")
    # The vSensor's part bounds-checked (a frame too short for it goes on), then the rest.
    alone = bounded_and(compile_filter("not (host 192.0.2.254 and tcp port 8443)"),
                        compile_filter("not port 53"))
    assert program.instructions[-len(alone):] == alone.instructions

    rng = random.Random(11)
    big = AddressSet([(x, x) for x in sorted(rng.sample(range(1 << 32), 2500))])
    sensor.set_vsensor_filter("not (host 192.0.2.254 and tcp port 8443)", big)
    assert sensor.program(LINKTYPE_ETHERNET) == alone
    (note,) = sensor.filter_notes
    assert "2500 IPv4" in note and "4096" in note and "left out" in caplog.text

    # Too many IPv6 peers (random addresses all over): the IPv4 part is kept on its own.
    v6 = AddressSet((), [(x, x) for x in sorted(rng.getrandbits(128) for _ in range(600))])
    mixed = AddressSet(small.v4, v6.v6)
    sensor.set_vsensor_filter("not (host 192.0.2.254 and tcp port 8443)", mixed)
    assert sensor.program(LINKTYPE_ETHERNET) == with_exclusion(small, alone)
    (note,) = sensor.filter_notes
    assert note.startswith("link type 1: the IPv6 peer ranges are left out: ")
    assert "600 IPv6" in note


def test_sensors_claim_their_ranges_and_shared_ones_belong_to_nobody():
    a = claimed_set(["192.0.2.10", "172.17.0.1", "fe80::1", "127.0.0.1"], ["198.51.100.0/26"])
    b = claimed_set(["192.0.2.11", "172.17.0.1"], ["198.51.100.64/26", "2001:db8:b::/64"])
    once = claimed_once([a, b])
    assert once.texts() == ["192.0.2.10/31", "198.51.100.0/25", "2001:db8:b::/64"]
    assert peer_set(a, once).texts() == ["192.0.2.11", "198.51.100.64/26", "2001:db8:b::/64"]
    # Traffic between a's pod and b's pod: only b (higher) drops it; a stores both directions.
    assert lower_address_excluded(peer_set(b, once), "198.51.100.70", "198.51.100.5")
    assert not lower_address_excluded(peer_set(a, once), "198.51.100.70", "198.51.100.5")
    assert not lower_address_excluded(peer_set(a, once), "172.17.0.1", "198.51.100.70")


def test_the_vsensor_sends_peer_ranges_to_sensors_that_ask_and_only_when_they_change(
        tmp_path, tls):
    from ossensor_core.wire.signing import PATH_HEARTBEAT, PATH_REGISTER
    from tests.helpers.vsensor import running
    from tests.helpers.vsensor import settings as vsettings

    def register(name: str, address: str, pods: str) -> bytes:
        return json.dumps({"sensor": name, "versions": [1], "addresses": [address],
                           "workloads": [pods], "features": ["peer-ranges"]}).encode()

    async def scenario():
        async with running(vsettings(tmp_path), tls) as client:
            status, first, _ = await client.post(
                PATH_REGISTER, register("node-1", "192.0.2.10", "198.51.100.64/26"),
                sensor="node-1")
            assert status == 200 and first["peer_ranges"]["ranges"] == []
            assert first["filter"].startswith("not (host 127.0.0.1 and ")  # the self part only
            status, second, _ = await client.post(
                PATH_REGISTER, register("node-2", "192.0.2.11", "198.51.100.0/26"),
                sensor="node-2")
            assert second["peer_ranges"]["ranges"] == ["192.0.2.10", "198.51.100.64/26"]
            assert second["peer_ranges"]["rule"] == "lower-address"
            beat = json.dumps({"interfaces": {}, "peer_ranges_id": first["peer_ranges"]["id"],
                               "filter_note": "peer exclusion left out: 5000 > 4096"}).encode()
            _, answer, _ = await client.post(PATH_HEARTBEAT, beat, sensor="node-1")
            ranges = answer["peer_ranges"]
            assert ranges["ranges"] == ["192.0.2.11", "198.51.100.0/26"]  # changed: sent
            state = client.vsensor.sensors["node-1"]
            assert state.as_json()["filter_note"] == "peer exclusion left out: 5000 > 4096"
            beat = json.dumps({"interfaces": {}, "peer_ranges_id": ranges["id"]}).encode()
            _, answer, _ = await client.post(PATH_HEARTBEAT, beat, sensor="node-1")
            assert answer["peer_ranges"] == {"id": ranges["id"], "rule": "lower-address"}
            assert state.workloads == ["198.51.100.64/26"]
            assert state.filter_note == ""  # the sensor applied the whole filter since
    asyncio.run(scenario())


class RecordingControl:
    """What the https transport sees of a sensor: one interface, and a filter note to report."""

    @property
    def applied(self) -> list[tuple[str, AddressSet | None]]:
        """The vSensor's part of each filter applied (``tests/helpers/own_filter.py``)."""
        return list(zip(vsensor_parts([e for e, _ in self.calls]),
                        [p for _, p in self.calls[1:]]))

    def __init__(self) -> None:
        self.calls: list[tuple[str, AddressSet | None]] = []
        self.filter_notes = {"link type 1: the IPv6 peer ranges are left out: 5210 > 4096": None}

    def set_vsensor_filter(self, expression: str, peers: AddressSet | None = None) -> str:
        self.calls.append((expression, peers))
        return "; ".join(self.filter_notes)  # the note, as SensorControl returns it

    def filter_note(self) -> str:
        return "; ".join(self.filter_notes)

    def capture_stats(self) -> dict:
        return {}

    def captured_interfaces(self) -> list:
        from ossensor_core.node.interfaces import Interface
        return [Interface("eth0", 2, 1, 0x1, ("192.0.2.10",))]


def test_the_transport_applies_peer_ranges_and_reports_its_filter_note(tmp_path, tls):
    """The sensor side of the exchange, against the reference vSensor over TLS: ranges arrive
    once, the id comes back in heartbeats, and the sensor's note reaches the status."""
    from ossensor_core.wire.chunk import ChunkCodec
    from ossensor_core.wire.signing import PATH_REGISTER
    from ossensor_plugins.transport_https import HttpsTransport
    from tests.helpers.vsensor import KEY, running
    from tests.helpers.vsensor import settings as vsettings

    async def scenario():
        async with running(vsettings(tmp_path, heartbeat_seconds=0.1), tls) as client:
            body = json.dumps({"sensor": "node-2", "versions": [1], "addresses": ["192.0.2.11"],
                               "workloads": ["198.51.100.0/26"]}).encode()
            assert (await client.post(PATH_REGISTER, body, sensor="node-2"))[0] == 200
            control = RecordingControl()
            sender = HttpsTransport("127.0.0.1", int(client.base.rsplit(":", 1)[1]), KEY,
                                    "node-1", ChunkCodec(), tls_verify=False, grace_seconds=0.5)
            await sender.start(control)
            state = None
            for _ in range(200):
                state = client.vsensor.sensors.get("node-1")
                if state is not None and state.filter_note:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a few more heartbeats: nothing is applied again
            await sender.aclose()
            return control, state, sender
    control, state, sender = asyncio.run(scenario())
    (expression, peers), = control.applied
    assert expression.startswith("not (host 127.0.0.1 and ")
    assert peers is not None and peers.texts() == ["192.0.2.11", "198.51.100.0/26"]
    assert sender.peer_ranges_id and sender.peer_ranges == peers
    assert state.filter_note.startswith("link type 1: the IPv6 peer ranges are left out")
    assert state.as_json()["workloads"] == sender.workloads


def test_older_sensors_get_the_same_rule_as_a_libpcap_expression():
    peers = AddressSet.parse(["192.0.2.11", "198.51.100.64/26", "2001:db8:b::/64"])
    result = build_filter(self_expression("192.0.2.1", [443]), peers)
    assert not result.peers_dropped
    assert "src net 198.51.100.64/26" in result.expression and "ip6[8:4]" in result.expression
    assert len(compile_filter(result.expression)) < BPF_MAXINSNS
    assert peers_expression(AddressSet()) == ""


def test_workload_ranges_rule():
    kinds = {1: "", 2: "bridge", 3: "veth", 4: "vxlan", 5: "bridge", 6: "veth"}
    routes = [Route("0.0.0.0/0", 5, True),  # br0 is the uplink: its LAN is not a workload
              Route("192.0.2.0/24", 5, False),
              Route("10.244.1.0/24", 2, False),  # cni0
              Route("10.244.2.0/24", 4, False),  # flannel.1: another node's pods
              Route("10.244.3.0/24", 1, True),  # via a gateway
              Route("10.244.9.7/32", 3, False), Route("10.244.9.6/32", 6, False),  # cali*
              Route("fe80::/64", 3, False), Route("2001:db8:9::/80", 3, False),
              Route("10.244.8.0/24", 3, False, unicast=False),  # a blackhole
              Route("10.244.7.0/24", 3, False, table=100)]
    assert workload_ranges(routes, kinds) == ["10.244.1.0/24", "10.244.9.6/31",
                                              "2001:db8:9::/80"]


