"""The pcapng store: a chunk is kept whole or not at all."""

from __future__ import annotations

import errno
import shutil
import subprocess

import pytest

from ossensor_core.wire.pcapng import PcapngWriter
from ossensor_vsensor.store import SensorStore, StoreError, safe_name
from tests.helpers.vsensor import make_chunk, stored_files


def test_a_failed_write_is_cut_off_again(tmp_path, monkeypatch):
    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    store.write_chunk(make_chunk(1, packets=2))
    (part,) = stored_files(tmp_path, "node-1")
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
    assert stored_files(tmp_path, "node-1") == [part]  # the raw file was removed
    monkeypatch.undo()

    store.write_chunk(make_chunk(3, packets=1))
    store.close()
    (done,) = stored_files(tmp_path, "node-1")
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


def _crash(store: SensorStore) -> None:
    """What SIGKILL leaves: the descriptors go, nothing is completed or renamed."""
    import os
    for _, opened in list(store._files._files.items()):
        os.close(opened.out.fd)
    if store._journal is not None:
        os.close(store._journal)


def test_recovery_keeps_exactly_the_acknowledged_chunks(tmp_path):
    from scapy.utils import PcapNgReader

    from ossensor_vsensor.store import recover

    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    for sequence in (1, 2, 3):
        store.write_chunk(make_chunk(sequence, packets=2))  # journaled: acknowledged
    # Chunk 4 reaches the file but the process dies before its journal line: never
    # acknowledged, so the sensor sends it again.
    store._files.write_chunk(make_chunk(4, packets=2))
    (part,) = stored_files(tmp_path, "node-1")
    with open(part, "ab") as handle:  # and half a block of a fifth write
        handle.write(b"\x06\x00\x00\x00\x40\x00")
    _crash(store)

    lines = recover(tmp_path / "node-1")
    assert len(lines) == 1 and "cut off" in lines[0]
    (done,) = stored_files(tmp_path, "node-1")
    assert done.suffix == ".pcapng"
    with PcapNgReader(str(done)) as reader:
        frames = [bytes(p) for p in reader]
    expected = [p.data for s in (1, 2, 3) for b in make_chunk(s, packets=2).batches
                for p in b.packets()]
    assert frames == expected

    again = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    again.load()
    assert [again.seen(s) for s in (1, 2, 3, 4)] == [True, True, True, False]
    again.write_chunk(make_chunk(4, packets=2))  # the retry is stored, once
    again.close()
    assert recover(tmp_path / "node-1") == []


def test_recovery_removes_a_file_with_no_acknowledged_chunk(tmp_path):
    from ossensor_vsensor.store import recover

    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    store.write_chunk(make_chunk(1, packets=2))
    store.close()  # completed: recovery leaves it alone
    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    store.load()
    store._files.write_chunk(make_chunk(2, packets=2))  # a new .part file, never journaled
    _crash(store)
    assert len(stored_files(tmp_path, "node-1")) == 2
    (line,) = recover(tmp_path / "node-1")
    assert "removed" in line
    (left,) = stored_files(tmp_path, "node-1")
    assert left.suffix == ".pcapng"


def test_journal_is_compacted(tmp_path, monkeypatch):
    import ossensor_vsensor.store as store_module

    monkeypatch.setattr(store_module, "SEQUENCE_MEMORY", 5)
    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    for sequence in range(1, 16):
        store.write_chunk(make_chunk(sequence, packets=1))
    store.close()
    entries = store_module.read_journal(tmp_path / "node-1" / store_module.JOURNAL)
    assert len(entries) <= 10 and entries[-1][0] == 15
    again = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    again.load()
    assert again.seen(15) and again.seen(11) and not again.seen(1)


def test_journal_compaction_holds_no_list_of_its_lines(tmp_path, monkeypatch):
    """Opening a long journal (the first chunk after a start) costs the same memory whatever
    its length: a list or deque of the kept lines was a transient of ~10 MiB that the heap
    kept, so each restarted vSensor started larger the longer the run."""
    import tracemalloc

    import ossensor_vsensor.store as store_module

    monkeypatch.setattr(store_module, "SEQUENCE_MEMORY", 10_000)
    folder = tmp_path / "node-1"
    folder.mkdir()
    journal = folder / store_module.JOURNAL
    journal.write_text("".join(f"{n} 20261207T000000Z-000001-ether.pcapng.part:{n * 977}\n"
                               for n in range(1, 20_001)))
    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    tracemalloc.start()
    try:
        store._compact(journal)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    entries = store_module.read_journal(journal)
    assert [e[0] for e in entries] == list(range(10_001, 20_001))
    assert store._journal_lines == 10_000
    assert peak < 256 * 1024, f"compacting 20,000 lines peaked at {peak} bytes"


def test_an_unfinished_last_journal_line_is_cut_before_the_next_is_appended(tmp_path):
    import ossensor_vsensor.store as store_module

    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    store.write_chunk(make_chunk(1, packets=1))
    store.close()
    journal = tmp_path / "node-1" / store_module.JOURNAL
    with open(journal, "ab") as out:
        out.write(b"2 20261207T000000Z-0000")  # the write of chunk 2's line was cut short
    again = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 20, rotate_seconds=300)
    again.load()
    again.write_chunk(make_chunk(3, packets=1))
    again.close()
    assert [seq for seq, _ in store_module.read_journal(journal)] == [1, 3]
    assert all(rest.endswith(tuple("0123456789")) and rest.count(":") == 1
               for _, rest in store_module.read_journal(journal))


def test_a_journal_line_written_in_part_is_undone_and_the_chunk_refused(tmp_path):
    """A real short write: RLIMIT_FSIZE lets the journal line reach the file only in part (as
    a disk that fills in the middle of it does). The part is cut off again and the chunk is
    refused, so no later line is appended to half of one."""
    import resource
    import signal

    import ossensor_vsensor.store as store_module

    store = SensorStore(tmp_path, "node-1", rotate_bytes=2048, rotate_seconds=300)
    journal = tmp_path / "node-1" / store_module.JOURNAL
    sequence = 0
    while (journal.stat().st_size if journal.exists() else 0) < 4096:
        sequence += 1
        store.write_chunk(make_chunk(sequence, packets=1))
    size = journal.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))
    try:
        with pytest.raises(StoreError) as info:
            store.write_chunk(make_chunk(sequence + 1, packets=1))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert "only in part" in str(info.value)
    assert journal.stat().st_size == size
    store.write_chunk(make_chunk(sequence + 2, packets=1))
    store.close()
    entries = store_module.read_journal(journal)
    assert [seq for seq, _ in entries][-2:] == [sequence, sequence + 2]
    assert journal.read_bytes().endswith(b"\n")
