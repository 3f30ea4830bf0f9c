"""A full disk (a small tmpfs, root only): 507, and what was stored stays valid pcapng."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk
from tests.helpers.vsensor import SENSOR, ether_frame, running, settings, stored_files


def big_chunk(sequence: int) -> Chunk:
    frame = ether_frame(sequence) + bytes(1400)
    batch = PacketBatch.from_frames("eth0", 2, 1, [(i, len(frame), frame) for i in range(40)])
    return Chunk(SENSOR, sequence, (batch,), 0)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_507_and_keeps_earlier_chunks_whole(tmp_path, tls, small_disk, caplog):
    async def scenario():
        async with running(settings(tmp_path, data_dir=small_disk), tls) as client:
            assert (await client.register())[0] == 200
            stored = 0
            for sequence in range(1, 20):
                status, answer, headers = await client.send_chunk(big_chunk(sequence))
                if status != 200:
                    break
                stored += answer["stored"]
            assert status == 507 and headers["Retry-After"] == "5", answer
            assert "disk full" in answer["error"]
            assert client.vsensor.sensors[SENSOR].packets == stored > 0
            await client.shutdown()
            return stored
    stored = asyncio.run(scenario())
    assert "No space left on device" in caplog.text
    (path,) = stored_files(small_disk)
    assert path.suffix == ".pcapng"
    if shutil.which("tcpdump"):
        out = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True,
                             check=True)
        assert len(out.stdout.splitlines()) == stored
        assert "truncated" not in out.stderr
