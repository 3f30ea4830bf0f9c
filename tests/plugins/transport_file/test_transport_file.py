"""The file transport: pcapng files that tcpdump and tshark read, one link type each, completed
(renamed from ``.part``) on rotation by size or age and at shutdown; failures are loud."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from ossensor_core.capture.batch import TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID, TPACKET3_HDR, \
    PacketBatch
from ossensor_core.pipeline.config import SensorConfig, read_core_config
from ossensor_core.errors import ConfigError, TransportError
from ossensor_core.pipeline.contracts import Chunk, Transport
from ossensor_core.pipeline.settings import PluginSettings, resolve_settings
from ossensor_core.wire import rotating_pcapng as pcapng_files
from ossensor_plugins import transport_file
from ossensor_plugins.transport_file import FileTransport

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
T0 = 1_700_000_000_123_456_789  # nanoseconds, with every digit significant
NAME = re.compile(r"^node-1-\d{8}T\d{6}Z-\d{6}-(ether|raw)\.pcapng$")


# Building chunks ---------------------------------------------------------------------------

def ethernet_frames(count: int, start: int = 0, port: int = 9999) -> list[bytes]:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    frames = []
    for i in range(start, start + count):
        l4 = UDP(sport=1024 + i, dport=port) if i % 2 else TCP(sport=1024 + i, dport=80,
                                                                 flags="PA")
        payload = bytes((i + j) & 0xFF for j in range((i * 37) % 1400))
        frames.append(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                            / IP(src="192.0.2.1", dst="192.0.2.2") / l4 / payload))
    return frames


def raw_ip_frames(count: int, start: int = 0) -> list[bytes]:
    from scapy.layers.inet import ICMP, IP

    return [bytes(IP(src="198.51.100.1", dst="198.51.100.2") / ICMP(seq=i) / (b"x" * i))
            for i in range(start, start + count)]


def batch(interface: str, linktype: int, frames: Sequence[bytes], t0: int = T0) -> PacketBatch:
    """Frames stamped t0, t0 + 1001 ns, ...; the last one was cut short by the snapshot length
    (its wire length exceeds what was captured)."""
    return PacketBatch.from_frames(interface, 3, linktype, [
        (t0 + i * 1001, len(f) + (20 if i == len(frames) - 1 else 0), f)
        for i, f in enumerate(frames)])


def vlan_batch(interface: str,
               records: Iterable[tuple[int, bytes, int, int | None]]) -> PacketBatch:
    """A batch as the afpacket ring delivers it: VLAN tag stripped, reported in the header.

    ``records``: (timestamp_ns, untagged frame, TCI, TPID or None for the default 802.1Q).
    """
    parts, count = [], 0
    for timestamp_ns, frame, tci, tpid in records:
        status = TP_STATUS_VLAN_VALID | (TP_STATUS_VLAN_TPID_VALID if tpid else 0)
        size = (TPACKET3_HDR.size + len(frame) + 15) & ~15
        seconds, nanoseconds = divmod(timestamp_ns, 1_000_000_000)
        parts.append(TPACKET3_HDR.pack(size, seconds, nanoseconds, len(frame), len(frame), status,
                                       TPACKET3_HDR.size, TPACKET3_HDR.size + 14, 0, tci,
                                       tpid or 0, 0))
        parts.append(frame + b"\0" * (size - TPACKET3_HDR.size - len(frame)))
        count += 1
    return PacketBatch(interface, 7, LINKTYPE_ETHERNET, b"".join(parts), count)


def chunk(*batches: PacketBatch, sequence: int = 0) -> Chunk:
    return Chunk("node-1", sequence, tuple(batches), T0)


def environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"VSENSOR_HOSTNAME": "vsensor.test", "VSENSOR_HMAC_KEY": "Kx9secretHMACkey42",
            "OSSENSOR_TRANSPORT": "file", "OSSENSOR_NAME": "node-1",
            "OSSENSOR_OUTPUT_DIR": str(tmp_path / "out"), **extra}


def make_config(env: dict[str, str]) -> tuple[SensorConfig, list[str]]:
    """The configuration as start-up builds it, with this plugin's settings only."""
    config, problems = read_core_config(env)
    group = transport_file.ossensor_settings()
    resolved = resolve_settings(group.settings, env, group.plugin, problems)
    return dataclasses.replace(config, plugin_settings={
        "file": PluginSettings("file", resolved)}), problems


def make_transport(tmp_path: Path, **extra: str) -> FileTransport:
    config, problems = make_config(environ(tmp_path, **extra))
    assert not problems
    transport = transport_file.ossensor_transport(config=config, encoder=None)
    assert isinstance(transport, Transport) and transport.name == "file"
    return transport


async def send_all(transport: FileTransport, *chunks: Chunk, close: bool = True) -> None:
    await transport.start()
    for item in chunks:
        await transport.send(item)
    if close:
        await transport.aclose()


# Reading files back ------------------------------------------------------------------------

def read_pcapng(path: Path) -> list[tuple[str, int, int, int, bytes]]:
    """(interface, link type, timestamp_ns, wire length, frame) of every packet, with scapy."""
    from scapy.utils import RawPcapNgReader

    packets = []
    with RawPcapNgReader(str(path)) as reader:
        for data, meta in reader:
            assert meta.tsresol == 1_000_000_000
            name = meta.ifname.decode() if isinstance(meta.ifname, bytes) else meta.ifname
            packets.append((name, meta.linktype, (meta.tshigh << 32) | meta.tslow, meta.wirelen,
                            data))
    return packets


def completed(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".pcapng")


def parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.part"))


def expected(*batches: PacketBatch) -> list[tuple[str, int, int, int, bytes]]:
    return [(b.interface, b.linktype, p.timestamp_ns, p.wire_length, p.data)
            for b in batches for p in b.packets()]


def needs(tool: str) -> Any:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


# Settings and configuration ----------------------------------------------------------------

def test_settings_are_read_from_their_variables(tmp_path: Path) -> None:
    config, problems = make_config(environ(tmp_path, OSSENSOR_FILE_ROTATE_BYTES="65536",
                                           OSSENSOR_FILE_ROTATE_SECONDS="2.5"))
    assert not problems
    settings = config.plugin("file")
    assert (settings.output_dir, settings.rotate_bytes, settings.rotate_seconds) == \
        (str(tmp_path / "out"), 65536, 2.5)
    variables = {r.variable for r in settings.resolved.values()}
    assert variables == {"OSSENSOR_OUTPUT_DIR", "OSSENSOR_FILE_ROTATE_BYTES",
                         "OSSENSOR_FILE_ROTATE_SECONDS"}


def test_settings_refuse_bad_values(tmp_path: Path) -> None:
    _, problems = make_config(environ(tmp_path, OSSENSOR_FILE_ROTATE_BYTES="100",
                                      OSSENSOR_FILE_ROTATE_SECONDS="0"))
    assert any(p.startswith("OSSENSOR_FILE_ROTATE_BYTES:") for p in problems)
    assert any(p.startswith("OSSENSOR_FILE_ROTATE_SECONDS:") for p in problems)


def test_configure_requires_an_output_dir(tmp_path: Path) -> None:
    config, _ = make_config(environ(tmp_path, OSSENSOR_OUTPUT_DIR=""))
    with pytest.raises(ConfigError) as info:
        transport_file.ossensor_configure(config=config)
    (problem,) = info.value.problems
    assert problem.startswith("OSSENSOR_OUTPUT_DIR: is not set")


def test_configure_ignores_the_setting_for_another_transport(tmp_path: Path) -> None:
    config, _ = make_config(environ(tmp_path, OSSENSOR_OUTPUT_DIR="", OSSENSOR_TRANSPORT="https"))
    transport_file.ossensor_configure(config=config)


def test_configure_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    config, _ = make_config(environ(tmp_path, OSSENSOR_OUTPUT_DIR=str(target)))
    transport_file.ossensor_configure(config=config)
    assert target.is_dir() and not list(target.iterdir())  # the write probe is removed


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_configure_refuses_a_folder_it_cannot_use(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    target = blocker if where == "file" else blocker / "out"
    config, _ = make_config(environ(tmp_path, OSSENSOR_OUTPUT_DIR=str(target)))
    with pytest.raises(ConfigError) as info:
        transport_file.ossensor_configure(config=config)
    (problem,) = info.value.problems
    assert problem.startswith("OSSENSOR_OUTPUT_DIR: ") and str(target) in problem
    assert ("not a folder" in problem) if where == "file" else ("cannot create" in problem)


def test_start_up_reports_the_output_dir_with_the_other_problems(tmp_path: Path) -> None:
    """Through the real start-up: entry points, settings hook, configure hook."""
    from ossensor_core.pipeline.startup import prepare

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    env = environ(tmp_path, OSSENSOR_OUTPUT_DIR=str(blocker / "out"),
                  OSSENSOR_CAPTURE_BACKEND="scapy",
                  OSSENSOR_CONFIG_PATH=str(tmp_path / "etc" / "ossensor.cfg"))
    with pytest.raises(ConfigError) as info:
        prepare(env, write_config=False)
    assert any(p.startswith("OSSENSOR_OUTPUT_DIR: cannot create") for p in info.value.problems)


# Writing -----------------------------------------------------------------------------------

def test_round_trip_one_link_type_per_file(tmp_path: Path) -> None:
    eth0 = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(20))
    tun0 = batch("tun0", LINKTYPE_RAW, raw_ip_frames(7), t0=T0 + 5)
    eth1 = batch("eth1", LINKTYPE_ETHERNET, ethernet_frames(5, start=20), t0=T0 + 10**9)
    transport = make_transport(tmp_path)
    asyncio.run(send_all(transport, chunk(eth0, tun0), chunk(eth1, sequence=1)))

    out = tmp_path / "out"
    files = completed(out)
    assert not parts(out)
    assert [NAME.match(p.name).group(1) for p in files] == ["ether", "raw"]
    ether, raw = files
    assert read_pcapng(ether) == expected(eth0, eth1)
    assert read_pcapng(raw) == expected(tun0)
    assert transport.packets_written == 32
    assert transport.files_written == 2
    assert transport.bytes_written == sum(p.stat().st_size for p in files)


def test_files_are_part_until_complete(tmp_path: Path) -> None:
    transport = make_transport(tmp_path)
    out = tmp_path / "out"

    async def scenario() -> None:
        await transport.start()
        await transport.send(chunk(batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(3))))
        (part,) = parts(out)
        assert part.name.endswith(".pcapng.part") and not completed(out)
        await transport.aclose()
        assert completed(out) == [part.with_suffix("")]
        assert not parts(out)
        await transport.aclose()  # idempotent

    asyncio.run(scenario())


def test_rotation_by_size(tmp_path: Path) -> None:
    transport = make_transport(tmp_path, OSSENSOR_FILE_ROTATE_BYTES="8192")
    batches = [batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(4, start=4 * i), t0=T0 + i * 10**6)
               for i in range(12)]
    out = tmp_path / "out"

    async def scenario() -> None:
        await transport.start()
        for number, item in enumerate(batches):
            await transport.send(chunk(item, sequence=number))
            assert len(parts(out)) <= 1
        assert transport.files_written >= 2  # rotated while running, not only at the end
        await transport.aclose()

    asyncio.run(scenario())
    files = completed(out)
    assert len(files) == transport.files_written >= 3
    assert not parts(out)
    for path in files[:-1]:
        assert 8192 <= path.stat().st_size < 8192 + 4 * 1600  # rotated after the chunk
    assert [p for path in files for p in read_pcapng(path)] == expected(*batches)
    assert len({NAME.match(p.name).group(0) for p in files}) == len(files)


def test_rotation_by_time_even_when_idle(tmp_path: Path) -> None:
    transport = make_transport(tmp_path, OSSENSOR_FILE_ROTATE_SECONDS="0.2")
    first = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(3))
    second = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(3, start=3), t0=T0 + 10**9)
    out = tmp_path / "out"

    async def scenario() -> None:
        await transport.start()
        await transport.send(chunk(first))
        assert len(parts(out)) == 1
        await asyncio.sleep(0.6)  # no chunk arrives; the file is completed anyway
        assert len(completed(out)) == 1 and not parts(out)
        await transport.send(chunk(second, sequence=1))
        assert len(parts(out)) == 1
        await transport.aclose()

    asyncio.run(scenario())
    files = completed(out)
    assert len(files) == 2
    assert [read_pcapng(p) for p in files] == [expected(first), expected(second)]


def test_vlan_tag_is_put_back(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    untagged = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                     / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5, dport=6) / b"tagged")
    vlan = vlan_batch("eth0", [(T0, untagged, 100, None), (T0 + 7, untagged, 0x2000 | 42, 0x88A8)])
    transport = make_transport(tmp_path)
    asyncio.run(send_all(transport, chunk(vlan)))

    (path,) = completed(tmp_path / "out")
    first, second = read_pcapng(path)
    assert first == ("eth0", 1, T0, len(untagged) + 4,
                     untagged[:12] + bytes.fromhex("81000064") + untagged[12:])
    assert second == ("eth0", 1, T0 + 7, len(untagged) + 4,
                      untagged[:12] + bytes.fromhex("88a8202a") + untagged[12:])


def test_empty_chunks_make_no_file(tmp_path: Path) -> None:
    transport = make_transport(tmp_path)
    empty = PacketBatch.from_frames("eth0", 3, LINKTYPE_ETHERNET, [])
    asyncio.run(send_all(transport, chunk(), chunk(empty, sequence=1)))
    assert not list((tmp_path / "out").iterdir())
    assert (transport.files_written, transport.packets_written) == (0, 0)


def test_names_never_collide_with_an_earlier_run(tmp_path: Path) -> None:
    frames = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(2))
    for _ in range(3):  # the same sensor restarted within the same second
        asyncio.run(send_all(make_transport(tmp_path), chunk(frames)))
    assert len(completed(tmp_path / "out")) == 3


def test_sensor_name_is_the_file_name_and_other_names_are_refused(tmp_path: Path) -> None:
    """One rule for sensor names at both ends (issue 15): a name outside it never reaches the
    transport (start-up refuses it, naming the variable); a name inside it is the file name."""
    _, problems = make_config(environ(tmp_path, OSSENSOR_NAME="node/1 x"))
    assert len(problems) == 1 and problems[0].startswith("OSSENSOR_NAME: 'node/1 x'")
    transport = make_transport(tmp_path, OSSENSOR_NAME="node-1.a_b")
    asyncio.run(send_all(transport, chunk(batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(1)))))
    (path,) = completed(tmp_path / "out")
    assert path.name.startswith("node-1.a_b-")


# Reading with the usual tools --------------------------------------------------------------

@pytest.fixture
def written(tmp_path: Path) -> tuple[list[Path], list[PacketBatch]]:
    batches = [batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(10)),
               batch("veth7a9", LINKTYPE_ETHERNET, ethernet_frames(4, start=10), t0=T0 + 99),
               batch("tun0", LINKTYPE_RAW, raw_ip_frames(5), t0=T0 + 3)]
    asyncio.run(send_all(make_transport(tmp_path), chunk(*batches)))
    return completed(tmp_path / "out"), batches


@needs("tcpdump")
def test_tcpdump_reads_the_files(written) -> None:
    files, batches = written
    for path, count in zip(files, (14, 5)):
        result = subprocess.run(["tcpdump", "-r", str(path), "-nn"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == count
        assert "truncated" not in result.stderr


@needs("tshark")
def test_tshark_reads_names_timestamps_and_lengths(written) -> None:
    files, batches = written
    ether, raw = files
    for path, chosen in ((ether, batches[:2]), (raw, batches[2:])):
        result = subprocess.run(
            ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
             "-e", "frame.time_epoch", "-e", "frame.len", "-e", "frame.cap_len",
             "-e", "frame.protocols"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        rows = [line.split("\t") for line in result.stdout.splitlines()]
        want = [(name, ts, length, len(data))
                for name, _, ts, length, data in expected(*chosen)]
        assert [(r[0], int(r[1].replace(".", "")), int(r[2]), int(r[3])) for r in rows] == want
        first = "eth:ethertype:ip" if path is ether else "raw:ip"
        assert all(r[4].startswith(first) for r in rows), rows[0][4]


# Failures ----------------------------------------------------------------------------------

def test_start_fails_on_a_folder_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    transport = make_transport(tmp_path, OSSENSOR_OUTPUT_DIR=str(blocker / "out"))
    with pytest.raises(TransportError, match=re.escape(str(blocker / "out"))):
        asyncio.run(transport.start())


def test_folder_gone_while_running(tmp_path: Path) -> None:
    transport = make_transport(tmp_path, OSSENSOR_FILE_ROTATE_BYTES="4096")
    out = tmp_path / "out"
    big = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(30))

    async def scenario() -> None:
        await transport.start()
        await transport.send(chunk(big))  # over 4096 bytes: completed at once
        assert transport.files_written == 1
        shutil.move(out, tmp_path / "moved")
        out.write_text("now a file")
        with pytest.raises(TransportError) as info:
            await transport.send(chunk(big, sequence=1))
        message = str(info.value)
        assert str(out) in message and ".pcapng.part" in message and "Not a directory" in message
        assert "chunk 1 (30 packets) was not stored" in message
        await transport.aclose()

    asyncio.run(scenario())
    assert transport.packets_written == 30 and transport.files_written == 1


def test_a_file_that_cannot_be_completed_is_reported(tmp_path: Path, caplog) -> None:
    """The chunk was written (send succeeds) but the file cannot be renamed: logged at once as
    an error, and raised again by aclose so that shutdown does not look clean."""
    transport = make_transport(tmp_path, OSSENSOR_FILE_ROTATE_BYTES="4096")
    out = tmp_path / "out"
    small = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(3))

    async def scenario() -> None:
        await transport.start()
        await transport.send(chunk(small))
        shutil.move(out, tmp_path / "moved")  # the open file moves with its folder
        out.write_text("now a file")
        await transport.send(chunk(batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(30)),
                                   sequence=1))  # written, then the rotation fails
        assert "cannot complete" in caplog.text
        with pytest.raises(TransportError, match="cannot complete .*Not a directory"):
            await transport.aclose()

    asyncio.run(scenario())
    (left,) = parts(tmp_path / "moved")
    assert len(read_pcapng(left)) == 33


class FullDisk:
    """Stands in for the ``os`` module of ossensor_core.wire.rotating_pcapng: writes fail once ``room`` bytes are used,
    after a short write, as on a full file system."""

    def __init__(self, room: int) -> None:
        import os

        self._os = os
        self.room = room

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = self._os.write(fd, bytes(data[:self.room]))
        self.room -= written
        return written


def test_disk_full_loses_no_accepted_chunk(tmp_path: Path, monkeypatch) -> None:
    """The failed chunk is cut off again: the file keeps the chunks accepted before it, whole,
    and is completed; the next chunk goes to a new file once there is room again."""
    transport = make_transport(tmp_path)
    out = tmp_path / "out"
    accepted = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(6))
    refused = [batch("tun0", LINKTYPE_RAW, raw_ip_frames(3), t0=T0 + 10**9),
               batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(30, start=6), t0=T0 + 10**9)]
    later = batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(2, start=40), t0=T0 + 2 * 10**9)
    disk = FullDisk(room=1 << 30)
    monkeypatch.setattr(pcapng_files, "os", disk)

    async def scenario() -> None:
        await transport.start()
        await transport.send(chunk(accepted))
        disk.room = 5000  # part of the next chunk fits
        with pytest.raises(TransportError) as info:
            await transport.send(chunk(*refused, sequence=1))
        assert "No space left on device" in str(info.value)
        assert re.search(r"node-1-.*-ether\.pcapng\.part", str(info.value))
        assert not parts(out)  # the earlier file was completed, the new raw file removed
        disk.room = 1 << 30
        await transport.send(chunk(later, sequence=2))
        await transport.aclose()

    asyncio.run(scenario())
    files = completed(out)
    assert [read_pcapng(p) for p in files] == [expected(accepted), expected(later)]
    assert transport.packets_written == 8
    assert transport.bytes_written == sum(p.stat().st_size for p in files)
    if shutil.which("tcpdump"):
        result = subprocess.run(["tcpdump", "-r", str(files[0]), "-nn"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and "truncated" not in result.stderr


def test_send_after_close_is_refused(tmp_path: Path) -> None:
    transport = make_transport(tmp_path)

    async def scenario() -> None:
        await transport.start()
        await transport.aclose()
        with pytest.raises(TransportError, match="closed"):
            await transport.send(chunk(batch("eth0", LINKTYPE_ETHERNET, ethernet_frames(1))))

    asyncio.run(scenario())


def test_struct_layout_used_for_vlan_records() -> None:
    """The hand-built records above follow struct tpacket3_hdr (48 bytes)."""
    assert TPACKET3_HDR.size == 48
    record = vlan_batch("eth0", [(T0, b"\x00" * 60, 5, None)])
    (header,) = record.headers()
    assert header[5] & TP_STATUS_VLAN_VALID and header[7] == 5
    assert struct.unpack_from("<I", record.data, 0)[0] == 48 + 64
