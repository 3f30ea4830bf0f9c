"""End-to-end tests of the ``afpacket`` capture backend, against tcpdump as the reference.

Each test builds its own namespaces (``netns_pair``: sender, receiver), captures inside them with
the backend (``tests.helpers.traffic capture``, which writes pcapng) and, where a reference helps,
with tcpdump on the same interface at the same time; then both files are compared frame by frame,
byte for byte. Traffic never leaves the namespaces and every loop is bounded.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pluggy
import pytest
from ossensor_plugins import capture_afpacket
from ossensor_plugins.capture_afpacket import AfPacketBackend, min_block_size

from ossensor_core.errors import ConfigError
from ossensor_core.pipeline.config import SensorConfig, read_core_config
from ossensor_core.pipeline.contracts import CaptureBackend
from ossensor_core.pipeline.loading import LoadedPlugins, load_one, new_plugin_manager
from ossensor_core.pipeline.startup import plugin_settings
from ossensor_core.plugin import CAPTURE_GROUP
from tests.helpers.netns import Namespace, veth_pair
from tests.helpers.traffic import (
    ROOT,
    SEQ_MAGIC,
    CaptureProcess,
    Helper,
    Tcpdump,
    run_helper,
)

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
# tcpdump hands over a block when it is full or after its 1 s timeout; the kernel retires a
# partly filled block on the second timer tick at the latest, so wait this long after the last
# packet before stopping it.
TCPDUMP_SETTLE = 2.2
TEST_NETWORKS = [ipaddress.ip_network(n) for n in
                 ("192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32")]

Frame = tuple[bytes, int]  # captured bytes, length on the wire


# -- reading and comparing captures ------------------------------------------------------------


@dataclasses.dataclass
class CaptureFile:
    """A capture file as scapy reads it (not with our writer's code): link type, frames and
    their timestamps in nanoseconds."""

    linktype: int
    frames: list[Frame]
    timestamps: list[int]


def read_capture(path: Path) -> CaptureFile:
    from scapy.utils import RawPcapReader

    reader = RawPcapReader(str(path))
    frames, timestamps = [], []
    try:
        for data, meta in reader:
            frames.append((bytes(data), meta.wirelen))
            if hasattr(meta, "tshigh"):  # pcapng
                ticks = (meta.tshigh << 32) | meta.tslow
                timestamps.append(ticks * 10**9 // meta.tsresol)
            else:
                timestamps.append(meta.sec * 10**9 + meta.usec * 1000)
    finally:
        reader.close()
    return CaptureFile(_linktype(path), frames, timestamps)


def _linktype(path: Path) -> int:
    """The link type in the file header (pcap) or the first interface block (pcapng)."""
    data = path.read_bytes()[:4096]
    magic = struct.unpack_from("<I", data)[0]
    if magic == 0x0A0D0D0A:
        shb_len = struct.unpack_from("<I", data, 4)[0]
        block_type, _, linktype = struct.unpack_from("<IIH", data, shb_len)
        assert block_type == 1, "pcapng without an interface block after the section header"
        return linktype
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    return struct.unpack_from(f"{endian}I", data, 20)[0]


def ip_header(frame: bytes, linktype: int) -> tuple[int, int] | None:
    """(IP version, offset of the IP header), skipping Ethernet and 802.1Q tags; None if not IP."""
    if linktype == LINKTYPE_RAW:
        return (frame[0] >> 4, 0) if frame else None
    offset = 12
    while len(frame) >= offset + 2:
        ethertype = struct.unpack_from("!H", frame, offset)[0]
        if ethertype in (0x8100, 0x88A8):
            offset += 4
            continue
        if ethertype == 0x0800:
            return 4, offset + 2
        if ethertype == 0x86DD:
            return 6, offset + 2
        return None
    return None


def addresses(frame: bytes, linktype: int) -> tuple[str, str] | None:
    found = ip_header(frame, linktype)
    if found is None:
        return None
    version, at = found
    if version == 4 and len(frame) >= at + 20:
        return (str(ipaddress.IPv4Address(frame[at + 12:at + 16])),
                str(ipaddress.IPv4Address(frame[at + 16:at + 20])))
    if version == 6 and len(frame) >= at + 40:
        return (str(ipaddress.IPv6Address(frame[at + 8:at + 24])),
                str(ipaddress.IPv6Address(frame[at + 24:at + 40])))
    return None


def is_test_traffic(frame: bytes, linktype: int) -> bool:
    """An IP packet between two addresses the tests assigned."""
    pair = addresses(frame, linktype)
    return pair is not None and all(
        any(ipaddress.ip_address(a) in net for net in TEST_NETWORKS) for a in pair)


def udp_ports(frame: bytes, linktype: int) -> tuple[int, int] | None:
    """(source, destination) port of an unfragmented-or-first-fragment UDP/IPv4 packet."""
    found = ip_header(frame, linktype)
    if found is None or found[0] != 4:
        return None
    at = found[1]
    if frame[at + 9] != 17 or struct.unpack_from("!H", frame, at + 6)[0] & 0x1FFF:
        return None
    udp = at + (frame[at] & 0x0F) * 4
    return struct.unpack_from("!HH", frame, udp)


def traffic_window(frames: list[Frame], linktype: int) -> slice:
    """From the first to the last frame of test traffic.

    The two captures start and stop a few milliseconds apart; a stray packet outside the test's
    traffic (an IPv6 router solicitation after link-up) may fall in one file and not the other.
    Everything between the first and last test packet must match, strays included.
    """
    marks = [i for i, (data, _) in enumerate(frames) if is_test_traffic(data, linktype)]
    assert marks, "no test traffic captured"
    return slice(marks[0], marks[-1] + 1)


def assert_same_window(ours: CaptureFile, reference: CaptureFile) -> list[Frame]:
    """The test traffic of both files is the same; timestamps agree to within 50 ms (they are
    taken separately for each socket when the packet has none). Returns our window."""
    assert ours.linktype == reference.linktype
    mine = traffic_window(ours.frames, ours.linktype)
    theirs = traffic_window(reference.frames, reference.linktype)
    assert_same_frames(ours.frames[mine], reference.frames[theirs], ours.linktype,
                       reference.timestamps[theirs])
    stamps: dict[Frame, list[int]] = {}
    for frame, stamp in zip(reference.frames[theirs], reference.timestamps[theirs]):
        stamps.setdefault(frame, []).append(stamp)
    skew = max(abs(stamp - stamps[frame].pop(0))
               for frame, stamp in zip(ours.frames[mine], ours.timestamps[mine]))
    assert skew < 50_000_000, f"timestamps differ from tcpdump's by up to {skew} ns"
    return ours.frames[mine]


# Two frames may reach two packet sockets in opposite orders only if the kernel handed them over
# at the same instant on two CPUs: their timestamps (taken once per frame, shared by both
# sockets) are then this close. A ring that returned blocks or frames out of order would move
# frames much further apart in time than this.
CONCURRENT_NS = 1_000_000
REORDER_REACH = 64  # frames: how far a frame may be from its place before it is a plain defect


def assert_same_frames(ours: list[Frame], reference: list[Frame], linktype: int,
                       stamps: list[int] | None = None) -> None:
    """The same frames, byte for byte, with the same wire lengths, in the same order.

    "The same order" allows one thing: frames handed to the packet sockets at the same instant
    by two CPUs may appear in either order, because each CPU delivers its frame to every socket
    in turn. That happens across directions (an incoming frame and an outgoing one) and within
    one (TCP sends from the application's CPU and from the CPU that took the ACK). With
    ``stamps`` (tcpdump's timestamps of ``reference``), a swap is accepted only between frames
    stamped within :data:`CONCURRENT_NS`; without them, only across directions.
    """
    if ours == reference:
        return
    missing = Counter(reference) - Counter(ours)
    extra = Counter(ours) - Counter(reference)
    if not missing and not extra:
        if stamps is None:
            _assert_order_per_direction(ours, reference, linktype)
        else:
            _assert_only_concurrent_swaps(ours, reference, stamps)
        return
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b),
                 min(len(ours), len(reference)))
    detail = ""
    if first < min(len(ours), len(reference)):
        detail = (f"; first difference at frame {first}: ours {len(ours[first][0])} bytes "
                  f"{ours[first][0][:64].hex()}, tcpdump {len(reference[first][0])} bytes "
                  f"{reference[first][0][:64].hex()}")
    pytest.fail(f"afpacket captured {len(ours)} frames, tcpdump {len(reference)}: "
                f"{sum(missing.values())} missing, {sum(extra.values())} extra{detail}")


def _assert_order_per_direction(ours: list[Frame], reference: list[Frame],
                                linktype: int) -> None:
    def flows(frames: list[Frame]) -> dict[object, list[Frame]]:
        split: dict[object, list[Frame]] = {}
        for frame in frames:
            split.setdefault(addresses(frame[0], linktype), []).append(frame)
        return split

    theirs = flows(reference)
    reordered = [key for key, frames in flows(ours).items() if theirs[key] != frames]
    if reordered:
        pytest.fail(f"same {len(ours)} frames as tcpdump, but in another order within "
                    f"{reordered}")


def _assert_only_concurrent_swaps(ours: list[Frame], reference: list[Frame],
                                  stamps: list[int]) -> None:
    """Every pair of frames in another order than tcpdump's was stamped within
    :data:`CONCURRENT_NS`, and no frame is more than :data:`REORDER_REACH` from its place."""
    places: dict[Frame, list[int]] = {}
    for index, frame in enumerate(reference):
        places.setdefault(frame, []).append(index)
    taken = {frame: iter(indices) for frame, indices in places.items()}
    order = [next(taken[frame]) for frame in ours]  # identical frames keep their own order
    far = [(i, at) for i, at in enumerate(order) if abs(i - at) > REORDER_REACH]
    if far:
        pytest.fail(f"same {len(ours)} frames as tcpdump, but {len(far)} of them far from their "
                    f"place (first: ours #{far[0][0]} is tcpdump's #{far[0][1]})")
    swaps = [(order[i], order[j]) for i in range(len(order))
             for j in range(i + 1, min(i + 1 + 2 * REORDER_REACH, len(order)))
             if order[j] < order[i]]
    slow = [(a, b) for a, b in swaps if abs(stamps[a] - stamps[b]) >= CONCURRENT_NS]
    if slow:
        a, b = slow[0]
        pytest.fail(f"same {len(ours)} frames as tcpdump, but {len(slow)} pairs in another "
                    f"order that were not concurrent (first: tcpdump's #{b} and #{a}, "
                    f"{abs(stamps[a] - stamps[b])} ns apart)")


def test_order_check_accepts_only_concurrent_swaps() -> None:
    """The order check itself: a swap of two frames stamped 10 µs apart passes; the same swap
    1 s apart, or a frame moved past :data:`REORDER_REACH`, fails."""
    frames = [(bytes([i]) * 60, 60) for i in range(200)]
    stamps = [i * 1_000_000_000 for i in range(200)]
    swapped = frames[:]
    swapped[5], swapped[6] = swapped[6], swapped[5]
    close = stamps[:]
    close[6] = close[5] + 10_000
    assert_same_frames(swapped, frames, LINKTYPE_ETHERNET, close)
    with pytest.raises(pytest.fail.Exception, match="not concurrent"):
        assert_same_frames(swapped, frames, LINKTYPE_ETHERNET, stamps)
    moved = frames[1:100] + frames[:1] + frames[100:]
    with pytest.raises(pytest.fail.Exception, match="far from their place"):
        assert_same_frames(moved, frames, LINKTYPE_ETHERNET, [0] * 200)


# -- fixtures ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Link:
    tx: Namespace
    rx: Namespace
    tx_dev: str
    rx_dev: str
    tmp: Path


@pytest.fixture
def link(netns_pair: tuple[Namespace, Namespace], tmp_path: Path) -> Iterator[Link]:
    """A veth between two fresh namespaces: tx0 192.0.2.1/24 <-> rx0 192.0.2.2/24, TSO on."""
    tx, rx = netns_pair
    with veth_pair(tx, rx) as (tx_dev, rx_dev):
        yield Link(tx, rx, tx_dev, rx_dev, tmp_path)


def settle_tcpdump(since: float) -> None:
    time.sleep(max(0.0, since + TCPDUMP_SETTLE - time.monotonic()))


def capture_with_reference(ns: Namespace, interface: str, tmp: Path,
                           traffic: Callable[[], object], expression: str = "",
                           ) -> tuple[dict, dict, CaptureFile, CaptureFile]:
    """Capture ``traffic()`` with afpacket and tcpdump at once; (our helper's result, tcpdump's
    counters, our pcapng, tcpdump's pcap)."""
    ours, reference = tmp / "afpacket.pcapng", tmp / "tcpdump.pcap"
    filter_options = ("--filter", expression) if expression else ()
    with CaptureProcess(ns, interface, ours, *filter_options) as capture, \
            Tcpdump(ns, interface, reference, expression) as tcpdump:
        traffic()
        quiet = time.monotonic()
        result = capture.stop()
        settle_tcpdump(quiet)
        counters = tcpdump.stop()
    assert result["written"] == len((mine := read_capture(ours)).frames)
    return result, counters, mine, read_capture(reference)


# -- configuration (no namespace needed) -------------------------------------------------------


def _configured(base_env: dict[str, str], **variables: str,
                ) -> tuple[pluggy.PluginManager, SensorConfig, list[str]]:
    """The plugin registered alone, and the configuration the core would give it."""
    manager = new_plugin_manager()
    manager.register(capture_afpacket, name="capture:afpacket")
    env = {**base_env, **variables}
    config, problems = read_core_config(env)
    settings = plugin_settings(LoadedPlugins(manager), env, problems)
    return manager, dataclasses.replace(config, plugin_settings=settings), problems


def test_entry_point_names_this_module() -> None:
    _, plugin = load_one(CAPTURE_GROUP, "afpacket", "OSSENSOR_CAPTURE_BACKEND")
    assert plugin is capture_afpacket


def test_default_settings_give_a_backend(base_env: dict[str, str]) -> None:
    manager, config, problems = _configured(base_env)
    assert problems == []
    manager.hook.ossensor_configure(config=config)
    backend = manager.hook.ossensor_capture_backend(config=config)
    assert isinstance(backend, CaptureBackend) and backend.name == "afpacket"
    assert (backend.block_size, backend.block_count, backend.block_timeout_ms) == (1 << 20, 16, 100)


def test_settings_come_from_afpacket_variables(base_env: dict[str, str]) -> None:
    manager, config, problems = _configured(
        base_env, OSSENSOR_AFPACKET_BLOCK_SIZE=str(256 << 10), OSSENSOR_AFPACKET_BLOCK_COUNT="4",
        OSSENSOR_AFPACKET_BLOCK_TIMEOUT_MS="20")
    assert problems == []
    backend = manager.hook.ossensor_capture_backend(config=config)
    assert (backend.block_size, backend.block_count, backend.block_timeout_ms) == (256 << 10, 4,
                                                                                   20)


@pytest.mark.parametrize("size, words", [
    ("5000", ["multiple of the page size"]),
    ("4096", ["too small", "64 KiB"]),
    (str(min_block_size() + 100), ["multiple of the page size"]),
])
def test_block_size_is_checked(base_env: dict[str, str], size: str, words: list[str]) -> None:
    manager, config, problems = _configured(base_env, OSSENSOR_AFPACKET_BLOCK_SIZE=size)
    assert problems == []
    with pytest.raises(ConfigError) as caught:
        manager.hook.ossensor_configure(config=config)
    message = str(caught.value)
    assert "OSSENSOR_AFPACKET_BLOCK_SIZE" in message
    assert all(word in message for word in words), message


def test_smallest_block_is_accepted(base_env: dict[str, str]) -> None:
    manager, config, _ = _configured(base_env, OSSENSOR_AFPACKET_BLOCK_SIZE=str(min_block_size()))
    manager.hook.ossensor_configure(config=config)


@pytest.mark.parametrize("variable, value", [("OSSENSOR_AFPACKET_BLOCK_COUNT", "1"),
                                             ("OSSENSOR_AFPACKET_BLOCK_TIMEOUT_MS", "0"),
                                             ("OSSENSOR_AFPACKET_BLOCK_SIZE", "lots")])
def test_bad_values_name_their_variable(base_env: dict[str, str], variable: str,
                                        value: str) -> None:
    _, _, problems = _configured(base_env, **{variable: value})
    assert len(problems) == 1 and problems[0].startswith(variable), problems


def test_backend_refuses_a_bad_ring() -> None:
    with pytest.raises(ConfigError, match="OSSENSOR_AFPACKET_BLOCK_COUNT"):
        AfPacketBackend(block_count=1)


# -- opening errors ----------------------------------------------------------------------------

_OPEN = """
import sys
from ossensor_core.capture.bpf import compile_filter
from ossensor_core.errors import CaptureError
from ossensor_core.node.interfaces import Interface
from ossensor_plugins.capture_afpacket import AfPacketBackend
interface = Interface(sys.argv[1], int(sys.argv[2]), 1, 1)
try:
    AfPacketBackend().open(interface, compile_filter("", 1)).close()
except CaptureError as exc:
    print("CaptureError:", exc, "| cause:", type(exc.__cause__).__name__)
else:
    print("opened")
"""


@pytest.mark.netns
def test_missing_interface_is_a_capture_error(netns: Namespace) -> None:
    out = netns.exec(sys.executable, "-c", _OPEN, "nosuch0", "4242", cwd=ROOT).stdout
    assert out.startswith("CaptureError:") and "nosuch0" in out and "no such interface" in out, out
    assert "cause: OSError" in out


@pytest.mark.netns
def test_without_cap_net_raw_says_so(netns: Namespace) -> None:
    command = f"{sys.executable} -c '{_OPEN}' lo 1"
    out = netns.exec("capsh", "--drop=cap_net_raw", "--", "-c", command, cwd=ROOT).stdout
    assert out.startswith("CaptureError:") and "needs CAP_NET_RAW" in out and "lo" in out, out
    assert "PermissionError" in out


# -- traffic -----------------------------------------------------------------------------------


@pytest.mark.netns
def test_fidelity_against_tcpdump(link: Link) -> None:
    """UDP of every size up to the MTU and fragmented beyond, ICMP, and a TSO'd TCP transfer:
    the same frames as tcpdump, byte for byte, in order, 64 KiB frames whole."""
    with Helper(link.rx, "tcp-sink", "--port", "5201") as sink:
        def traffic() -> None:
            run_helper(link.tx, "udp", "--dst", "192.0.2.2",
                       "--sizes", "1-1472,1473,2000,3000,8972,30000,65507")
            link.tx.exec("ping", "-c", "4", "-i", "0.02", "-s", "3000", "192.0.2.2")
            run_helper(link.tx, "tcp-send", "--dst", "192.0.2.2", "--port", "5201",
                       "--bytes", str(4 << 20))
            assert sink.finish()["received"] == 4 << 20

        result, counters, ours, reference = capture_with_reference(link.rx, link.rx_dev,
                                                                   link.tmp, traffic)
    linktype = ours.linktype
    assert linktype == reference.linktype == LINKTYPE_ETHERNET
    assert counters["dropped"] == 0, counters
    assert result["drops"] == 0 and result["packets"] >= result["written"], result
    assert result["largest_batch"] > 1, "one packet per block: batching does not work"
    window = assert_same_window(ours, reference)
    assert len(window) > 1472 + 44 + 8  # the datagrams, their fragments, the pings
    assert max(len(data) for data, _ in window) > 32 * 1024, "no TSO frame seen"
    large = [(data, wire) for data, wire in window if len(data) > 1514]
    assert large and all(len(data) == wire for data, wire in large), "a large frame was cut"
    datagrams = [ports for ports in (udp_ports(data, linktype) for data, _ in window)
                 if ports and ports[1] == 9999]
    assert len(datagrams) == 1472 + 6  # one unfragmented packet or first fragment each


TUN = "tun7"


@pytest.fixture
def tun(netns: Namespace) -> Iterator[Helper]:
    """A tun device in ``netns`` with 192.0.2.1/24 and 2001:db8::1/64, held open by a helper."""
    netns.exec("ip", "tuntap", "add", TUN, "mode", "tun")
    netns.ip("addr", "add", "192.0.2.1/24", "dev", TUN)
    netns.ip("-6", "addr", "add", "2001:db8::1/64", "dev", TUN, "nodad")
    netns.ip("link", "set", TUN, "up")
    with Helper(netns, "tun", "--name", TUN, "--count", "300") as holder:
        yield holder


@pytest.mark.netns
def test_tun_raw_ip_against_tcpdump(netns: Namespace, tun: Helper, tmp_path: Path) -> None:
    """A tun device delivers bare IP packets (link type 101); both directions match tcpdump."""
    link_info = netns.ip("-d", "link", "show", TUN).stdout
    assert "NO-CARRIER" not in link_info, link_info

    def traffic() -> None:
        tun.tell("go")
        assert tun.result()["written"] == 300

    result, counters, ours, reference = capture_with_reference(netns, TUN, tmp_path, traffic)
    linktype = ours.linktype
    assert linktype == reference.linktype == LINKTYPE_RAW
    assert result["drops"] == 0 and counters["dropped"] == 0
    window = assert_same_window(ours, reference)
    received = Counter(addresses(data, linktype) for data, _ in window)
    assert received[("192.0.2.99", "192.0.2.1")] == 200  # 100 UDP + 100 echo requests
    assert received[("2001:db8::99", "2001:db8::1")] == 100
    assert received[("192.0.2.1", "192.0.2.99")] >= 100  # echo replies (and port unreachables)
    # tcpdump itself reads our file and sees the link type.
    decoded = netns.exec("tcpdump", "-n", "-r", str(tmp_path / "afpacket.pcapng"))
    assert "link-type RAW" in decoded.stderr
    assert len(decoded.stdout.splitlines()) == len(ours.frames)
    assert "192.0.2.99.40000 > 192.0.2.1.9: UDP" in decoded.stdout


@pytest.mark.netns
def test_kernel_filter_keeps_others_out_of_user_space(link: Link) -> None:
    """Only matching packets reach the ring: PACKET_STATISTICS counts exactly those."""
    def traffic() -> None:
        sent = run_helper(link.tx, "udp", "--dst", "192.0.2.2", "--ports", "9999,9998,53,5353",
                          "--sizes", "10,200,1000", "--count", "1200")
        assert sent["per_port"]["9999"] == 300
        link.tx.exec("ping", "-c", "3", "-i", "0.02", "192.0.2.2")

    result, counters, ours, reference = capture_with_reference(
        link.rx, link.rx_dev, link.tmp, traffic, expression="udp port 9999")
    assert result["packets"] == result["written"] == 300, result
    assert result["drops"] == 0
    assert {udp_ports(data, ours.linktype)[1] for data, _ in ours.frames} == {9999}
    assert_same_frames(ours.frames, reference.frames, ours.linktype)
    assert counters["captured"] == 300


@pytest.mark.netns
def test_filter_naming_400_hosts(link: Link) -> None:
    """A long filter (over a thousand instructions) attaches and still does its job."""
    excluded = [f"198.51.100.{i}" for i in range(256)] + [f"203.0.113.{i}" for i in range(144)]
    expression = "udp and " + " and ".join(f"not host {host}" for host in excluded)
    link.tx.ip("addr", "add", "198.51.100.7/32", "dev", link.tx_dev)
    ours = link.tmp / "hosts.pcapng"
    with CaptureProcess(link.rx, link.rx_dev, ours, "--filter", expression) as capture:
        assert capture.ready["program_length"] > 1000
        run_helper(link.tx, "udp", "--dst", "192.0.2.2", "--count", "200")
        run_helper(link.tx, "udp", "--src", "198.51.100.7", "--dst", "192.0.2.2", "--count",
                   "100")
        result = capture.stop()
    captured = read_capture(ours)
    assert result["packets"] == result["written"] == len(captured.frames) == 200, result
    assert {addresses(data, captured.linktype) for data, _ in captured.frames} == \
        {("192.0.2.1", "192.0.2.2")}


@pytest.mark.netns
def test_filter_swapped_under_traffic_loses_nothing(link: Link) -> None:
    """set_filter replaces the filter atomically: a numbered stream arrives whole."""
    ours = link.tmp / "swap.pcapng"
    total = 3000
    with CaptureProcess(link.rx, link.rx_dev, ours, "--filter", "udp", "--swap", "udp or icmp",
                        "--swap-interval", "0.01") as capture:
        run_helper(link.tx, "udp", "--dst", "192.0.2.2", "--seq", "--sizes", "16,300",
                   "--count", str(total), "--pace", "10")
        result = capture.stop()
    assert result["swaps"] >= 20, result
    assert result["drops"] == 0, result
    captured = read_capture(ours)
    numbers = []
    for data, _ in captured.frames:
        at = data.find(SEQ_MAGIC)
        if at >= 0 and udp_ports(data, captured.linktype) is not None:
            numbers.append(struct.unpack_from("!I", data, at + len(SEQ_MAGIC))[0])
    assert len(numbers) == total and sorted(numbers) == list(range(total)), \
        f"{total - len(set(numbers))} missing, {len(numbers) - len(set(numbers))} duplicated"
    assert numbers == sorted(numbers)


def _vlan_frames(frames: list[Frame], tpid: bytes, vid: int) -> list[bytes]:
    return [data for data, _ in frames
            if data[12:14] == tpid and struct.unpack_from("!H", data, 14)[0] & 0xFFF == vid]


@pytest.mark.netns
def test_vlan_tags_are_restored(link: Link) -> None:
    """Tagged frames arrive with the outer tag stripped into the record header (TP_STATUS_VLAN_
    VALID, with its TPID); the capture file has it back in place, exactly as tcpdump writes it.
    The frames come from a packet socket, so no VLAN driver is needed; 802.1ad (QinQ) and
    priority bits included."""
    rx_mac = link.rx.exec("cat", f"/sys/class/net/{link.rx_dev}/address").stdout.strip()

    def traffic() -> None:
        for tags, sizes in (("0x8100:100", "1-100,1472"), ("0x8100:0xa065", "10,200"),
                            ("0x88a8:200,0x8100:100", "10,300"), ("", "50")):
            run_helper(link.tx, "ether", "--interface", link.tx_dev, "--dst-mac", rx_mac,
                       "--tags", tags, "--sizes", sizes)

    result, counters, ours, reference = capture_with_reference(link.rx, link.rx_dev, link.tmp,
                                                               traffic)
    window = assert_same_window(ours, reference)
    assert len(_vlan_frames(window, b"\x81\x00", 100)) == 101
    assert len(_vlan_frames(window, b"\x81\x00", 101)) == 2
    assert all(data[14] >> 5 == 5 for data in _vlan_frames(window, b"\x81\x00", 101))
    qinq = _vlan_frames(window, b"\x88\xa8", 200)
    assert len(qinq) == 2 and all(data[16:20] == b"\x81\x00\x00\x64" for data in qinq)
    assert sum(data[12:14] == b"\x08\x00" for data, _ in window) >= 1
    assert result["vlan_valid"] >= 105, "the kernel never stripped a tag: nothing was restored"
    assert result["drops"] == 0 and counters["dropped"] == 0


@pytest.mark.netns
def test_vlan_device_traffic(link: Link) -> None:
    """Traffic of real VLAN interfaces both ways (the receiver's replies are tagged on the way
    out), captured on the parent; needs the kernel's 8021q driver."""
    for ns, dev, address in ((link.tx, link.tx_dev, "198.51.100.1/24"),
                             (link.rx, link.rx_dev, "198.51.100.2/24")):
        made = ns.ip("link", "add", "link", dev, "name", f"{dev}.100", "type", "vlan", "id",
                     "100", check=False)
        if made.returncode:
            pytest.skip(f"no VLAN interfaces in this kernel: {made.stderr.strip()}")
        ns.ip("addr", "add", address, "dev", f"{dev}.100")
        ns.ip("link", "set", f"{dev}.100", "up")

    def traffic() -> None:
        run_helper(link.tx, "udp", "--dst", "198.51.100.2", "--sizes", "1-100,1472,3000")
        link.tx.exec("ping", "-c", "4", "-i", "0.02", "198.51.100.2")

    result, counters, ours, reference = capture_with_reference(link.rx, link.rx_dev, link.tmp,
                                                               traffic)
    window = assert_same_window(ours, reference)
    assert len(_vlan_frames(window, b"\x81\x00", 100)) >= 100 + 1 + 2 + 8
    assert result["drops"] == 0 and counters["dropped"] == 0


@pytest.mark.netns
def test_stats_count_what_was_sent(link: Link) -> None:
    """At a moderate rate nothing is dropped and the cumulative counter is exact."""
    ours = link.tmp / "stats.pcapng"
    with CaptureProcess(link.rx, link.rx_dev, ours, "--filter", "udp dst port 9999",
                        "--stats-interval", "0.05") as capture:
        run_helper(link.tx, "udp", "--dst", "192.0.2.2", "--sizes", "64,512,1400",
                   "--count", "2000", "--pace", "20")
        result = capture.stop()
    assert (result["packets"], result["drops"]) == (2000, 0), result
    assert result["written"] == 2000
    assert (result["packets_after_close"], result["drops_after_close"]) == (2000, 0)
    assert len(read_capture(ours).frames) == 2000


_DOWN_UP = """
import json, select, subprocess, sys, time
from ossensor_core.capture.bpf import compile_filter
from ossensor_core.node.interfaces import list_interfaces
from ossensor_plugins.capture_afpacket import AfPacketBackend
dev = sys.argv[1]
interface = next(i for i in list_interfaces() if i.name == dev)
source = AfPacketBackend(block_timeout_ms=10).open(interface, compile_filter("udp", 1))
poll = select.poll()
poll.register(source.fileno(), select.POLLIN)
def send(count):
    subprocess.run([sys.executable, "-m", "tests.helpers.traffic", "udp", "--dst", "192.0.2.2",
                    "--count", str(count)], check=True, capture_output=True)
def drain():
    got, deadline = 0, time.monotonic() + 0.5
    while time.monotonic() < deadline:
        got += sum(b.count for b in source.read())
        poll.poll(20)
    return got
report = {}
send(5); report["before"] = drain()
subprocess.run(["ip", "link", "set", dev, "down"], check=True)
time.sleep(0.05)
report["down_events"] = [e for _, e in poll.poll(200)]
report["down_read"] = len(source.read())
report["down_events_after_read"] = [e for _, e in poll.poll(100)]
subprocess.run(["ip", "link", "set", dev, "up"], check=True)
time.sleep(0.2)
send(7); report["after"] = drain()
report["stats"] = source.stats().packets
source.close()
print(json.dumps(report))
"""


@pytest.mark.netns
def test_interface_down_and_up_keeps_capturing(link: Link) -> None:
    """A link going down raises POLLERR (ENETDOWN); read() clears it instead of spinning the
    loop, and the capture carries on once the link is up again."""
    out = link.tx.exec(sys.executable, "-c", _DOWN_UP, link.tx_dev, cwd=ROOT).stdout
    report = json.loads(out)
    assert report["before"] == 5 and report["after"] == 7, report
    assert report["down_events"] and report["down_read"] == 0, report
    assert report["down_events_after_read"] == [], report
    assert report["stats"] == 12
