"""The example package's own tests, written with ossensor's testing kit (ossensor_core.testing).

Run them with ``python -m pytest examples/ossensor-pcapfile/tests`` once the package is installed.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from ossensor_core.plugin import CaptureError, ConfigError
from ossensor_core.testing import FakeCaptureSource, build_pipeline, read_capture_file, \
    write_capture_file
from ossensor_pcapfile import capture, ethertype

START_NS = 1_700_000_000_000_000_000


def frame(n: int, ethertype_value: int = 0x0800) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype_value.to_bytes(2, "big") + \
        n.to_bytes(4, "big") + bytes(40 + n % 50)


def packets(count: int, spacing_ns: int = 1000) -> list[tuple[int, int, bytes]]:
    return [(START_NS + n * spacing_ns, len(frame(n)) + (n % 3), frame(n)) for n in range(count)]


def write_pcapng(path: Path, frames: list[tuple[int, int, bytes]]) -> Path:
    return write_capture_file(path, frames, interface="eth0")


def write_pcap(path: Path, frames: list[tuple[int, int, bytes]], nano: bool = False) -> Path:
    magic, unit = (0xA1B23C4D, 1) if nano else (0xA1B2C3D4, 1000)
    parts = [struct.pack(">IHHiIII", magic, 2, 4, 0, 0, 65535, 1)]  # big-endian, on purpose
    for ts, wire, data in frames:
        parts += [struct.pack(">IIII", ts // 10**9, ts % 10**9 // unit, len(data), wire), data]
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("kind", ["pcapng", "pcap", "pcap-nano"])
def test_reader_agrees_with_scapy(tmp_path, kind):
    frames = packets(50)
    path = (write_pcapng(tmp_path / "in.pcapng", frames) if kind == "pcapng" else
            write_pcap(tmp_path / "in.pcap", frames, nano=kind == "pcap-nano"))
    with open(path, "rb") as handle:
        linktype, found = capture.read_packets(handle)
        assert (linktype, list(found)) == read_capture_file(path) == (1, frames)


def test_not_a_capture_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a capture file")
    with open(path, "rb") as handle, pytest.raises(CaptureError, match="not a pcap or pcapng"):
        capture.read_packets(handle)
    with pytest.raises(ConfigError, match="OSSENSOR_PCAPFILE_PATH: .*not a pcap"):
        build_pipeline([capture], {"OSSENSOR_CAPTURE_BACKEND": "pcapfile",
                                   "OSSENSOR_PCAPFILE_PATH": str(path)})


def pipeline_for(path: Path, **extra: str):
    return build_pipeline([capture, ethertype], {"OSSENSOR_CAPTURE_BACKEND": "pcapfile",
                                                 "OSSENSOR_PCAPFILE_PATH": str(path), **extra})


def test_fast_replay_hands_over_every_packet_in_batches(tmp_path):
    frames = packets(2000)
    pipeline = pipeline_for(write_pcapng(tmp_path / "in.pcapng", frames),
                            OSSENSOR_PCAPFILE_BATCH_PACKETS="300")
    source = pipeline.open("eth0")
    batches = pipeline.drain(source, idle_seconds=1.0)
    assert max(b.count for b in batches) == 300
    assert [(p.timestamp_ns, p.wire_length, p.data) for b in batches
            for p in b.packets()] == frames
    assert {b.interface for b in batches} == {"eth0"}
    source.close()  # idempotent after drain closed it


def test_recorded_pace(tmp_path):
    frames = packets(7, spacing_ns=100_000_000)  # 0.6 s of traffic
    pipeline = pipeline_for(write_pcap(tmp_path / "in.pcap", frames),
                            OSSENSOR_PCAPFILE_PACE="recorded")
    started = time.monotonic()
    batches = pipeline.drain(pipeline.open("eth0"), idle_seconds=1.0)
    assert sum(b.count for b in batches) == 7
    assert len(batches) >= 6  # handed over one by one, as they fell due
    assert time.monotonic() - started >= 0.55


def test_closing_mid_replay_stops_the_reader(tmp_path):
    path = write_pcapng(tmp_path / "in.pcapng", packets(50, spacing_ns=1_000_000_000))
    source = pipeline_for(path, OSSENSOR_PCAPFILE_PACE="recorded").open("eth0")
    time.sleep(0.2)
    source.close()
    assert not source._thread.is_alive()


def test_ethertype_filter(tmp_path):
    frames = [(START_NS + n, 60, frame(n, value)) for n, value in
              enumerate([0x0800, 0x86DD, 0x0806, 0x0800])]
    tagged = b"\x02" * 12 + b"\x81\x00\x00\x05\x86\xdd" + bytes(50)
    frames.append((START_NS + 9, len(tagged), tagged))
    pipeline = build_pipeline([ethertype], {"OSSENSOR_PLUGINS": "ethertype",
                                            "OSSENSOR_ETHERTYPE_DROP": "0x86dd, 2054"})
    pipeline.run_sync([FakeCaptureSource(frames)])
    assert [f[12:14] for f in pipeline.transport.frames()] == [b"\x08\x00", b"\x08\x00"]
    assert pipeline.filters[0].dropped == 3
    with pytest.raises(ConfigError, match="OSSENSOR_ETHERTYPE_DROP: 'ipv6' is not a number"):
        build_pipeline([ethertype], {"OSSENSOR_ETHERTYPE_DROP": "ipv6"})
