"""The pcapng store: a chunk is kept whole or not at all."""

from __future__ import annotations

import errno
import shutil
import subprocess

import pytest

from ossensor_core.pcapng import PcapngWriter
from ossensor_vsensor.store import SensorStore, StoreError, safe_name
from tests.vsensor.helpers import make_chunk


def test_a_failed_write_is_cut_off_again(tmp_path, monkeypatch):
    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    store.write_chunk(make_chunk(1, packets=2))
    (part,) = (tmp_path / "node-1").iterdir()
    size = part.stat().st_size

    original = PcapngWriter.write_batch
    calls = []

    def failing(self, batch):
        calls.append(batch)
        if len(calls) == 2:  # the second batch (a new file of another link type) fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, batch)

    monkeypatch.setattr(PcapngWriter, "write_batch", failing)
    with pytest.raises(StoreError) as info:
        store.write_chunk(make_chunk(2, packets=3, raw_packets=2))
    assert info.value.errno == errno.ENOSPC
    assert part.stat().st_size == size
    assert list((tmp_path / "node-1").iterdir()) == [part]  # the raw file was removed
    monkeypatch.undo()

    store.write_chunk(make_chunk(3, packets=1))
    store.close()
    (done,) = (tmp_path / "node-1").iterdir()
    assert done.suffix == ".pcapng"
    if shutil.which("tcpdump"):
        out = subprocess.run(["tcpdump", "-nr", str(done)], capture_output=True, text=True,
                             check=True).stdout
        assert len(out.splitlines()) == 3


def test_sensor_names_are_safe_path_components():
    assert safe_name("node-1") == "node-1"
    assert safe_name("../etc") == "_etc"
    assert safe_name("..") == "_"
    assert safe_name("a/b c") == "a_b_c"
