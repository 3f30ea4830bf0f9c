"""Retention: completed files go by age and by total size, oldest first; ``.part`` never."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from ossensor_vsensor.settings import VSensorSettings
from ossensor_vsensor.store import enforce_retention
from tests.helpers.vsensor import KEY, SENSOR, make_chunk, running, settings, stored_files


def _file(path, size: int, age: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_retention_by_age_keeps_part_files_and_the_tls_folder(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    old = _file(tmp_path / "a" / "1.pcapng", 10, 7200)
    new = _file(tmp_path / "a" / "2.pcapng", 10, 10)
    part = _file(tmp_path / "a" / "0.pcapng.part", 10, 99999)
    other = _file(tmp_path / "b" / "1.pcapng", 10, 3601)
    cert = _file(tmp_path / ".tls" / "old.pcapng", 10, 99999)
    assert sorted(enforce_retention(tmp_path, retain_seconds=3600)) == sorted([old, other])
    assert new.exists() and part.exists() and cert.exists()
    assert f"retention: deleted {old}" in caplog.text
    assert enforce_retention(tmp_path) == []  # nothing configured: nothing deleted


def test_retention_by_size_deletes_the_oldest_across_sensors(tmp_path):
    a1 = _file(tmp_path / "a" / "1.pcapng", 100, 50)
    b1 = _file(tmp_path / "b" / "1.pcapng", 100, 40)
    a2 = _file(tmp_path / "a" / "2.pcapng", 100, 30)
    b2 = _file(tmp_path / "b" / "2.pcapng", 100, 20)
    part = _file(tmp_path / "a" / "3.pcapng.part", 500, 100)  # not counted, not deleted
    assert enforce_retention(tmp_path, retain_bytes=250) == [a1, b1]
    assert a2.exists() and b2.exists() and part.exists()
    assert enforce_retention(tmp_path, retain_bytes=200) == []  # at the limit is fine
    # Both limits: age first, then size over what is left.
    assert enforce_retention(tmp_path, retain_seconds=25, retain_bytes=50) == [a2, b2]
    assert part.exists()


def test_settings_refuse_nonsense_retention(tmp_path):
    for changes in ({"retain_seconds": 0}, {"retain_bytes": -1}, {"retention_interval": 0}):
        with pytest.raises(ValueError):
            VSensorSettings(data_dir=tmp_path, keys=[KEY], **changes)


def test_the_vsensor_applies_retention_after_rotation_and_on_its_timer(tmp_path, tls, caplog):
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    stale = _file(data / "gone-sensor" / "1.pcapng", 10, 7200)
    stale_part = _file(data / "gone-sensor" / "2.pcapng.part", 10, 7200)

    async def wait_for(condition) -> None:
        for _ in range(100):
            if condition():
                return
            await asyncio.sleep(0.05)
        assert condition()

    async def scenario():
        # Every chunk completes a file (rotate_bytes=1); a long timer, so retention after the
        # rotation is what keeps the size down.
        async with running(settings(tmp_path, rotate_bytes=1, retain_seconds=3600,
                                    retain_bytes=1, retention_interval=3600.0),
                           tls) as client:
            await wait_for(lambda: not stale.exists())  # the first run, at start
            assert stale_part.exists()
            assert (await client.register())[0] == 200
            for sequence in range(1, 4):
                assert (await client.send_chunk(make_chunk(sequence)))[0] == 200
                await wait_for(lambda: stored_files(data) == [])
        # On the timer: a file that grows old while the vSensor runs.
        async with running(settings(tmp_path, retain_seconds=3600, retention_interval=0.05),
                           tls) as client:
            late = _file(data / SENSOR / "late.pcapng", 10, 10)
            await asyncio.sleep(0.2)
            assert late.exists()
            os.utime(late, (time.time() - 4000, time.time() - 4000))
            await wait_for(lambda: not late.exists())
    asyncio.run(scenario())
    assert stale_part.exists()
    assert caplog.text.count("retention: deleted") == 5  # stale, three chunks' files, late
