"""One rule for sensor names at both ends (issue 15, item 4), the vSensor's side: names outside
the rule get ``400 bad_sensor_name`` at registration and on every request, over real TLS; the
folder of a sensor is its name, so two names never share a folder or a journal."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ossensor_core.wire.names import PATH_CHUNKS, PATH_HEARTBEAT, PATH_REGISTER
from ossensor_core.wire.signing import sign
from tests.helpers.raw_tls import guarded, request_head, response
from tests.helpers.vsensor import KEY, make_chunk, running, settings, stored_files

#: Today's collision: all four mapped to the folder ``a_b``.
COLLIDING = ["a/b", "a_b", "a b", "a\\b"]


def run(coro):
    return asyncio.run(coro)


def test_names_that_collided_are_refused_and_the_valid_one_keeps_its_own_folder(
        tmp_path, tls, caplog):
    data = tmp_path / "data"

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            answers = {}
            for sequence, name in enumerate(COLLIDING, start=1):
                status, body, _ = await client.register(name)
                answers[name] = (status, body.get("error"))
                if status == 200:
                    assert (await client.send_chunk(make_chunk(sequence, sensor=name)))[:2] == (
                        200, {"stored": 3})
            return answers

    answers = run(scenario())
    assert answers == {"a/b": (400, "bad_sensor_name"), "a_b": (200, None),
                       "a b": (400, "bad_sensor_name"), "a\\b": (400, "bad_sensor_name")}
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["a_b"]
    assert len(stored_files(data, "a_b")) == 1
    assert caplog.text.count("breaks the rule") == 3


def test_valid_names_each_get_the_folder_of_their_own_name(tmp_path, tls):
    names = ["a_b", "a-b", "a.b", "a..b", "A_b", "a_b.", "x" * 253]

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            for sequence, name in enumerate(names, start=1):
                assert (await client.register(name))[0] == 200
                assert (await client.send_chunk(make_chunk(sequence, sensor=name)))[0] == 200
            await client.shutdown()

    run(scenario())
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == sorted(names)
    for name in names:
        assert len(stored_files(data, name)) == 1, name


@pytest.mark.parametrize("name", ["nöde", "节点", ".hidden", "..", "x" * 254, ""])
@pytest.mark.parametrize("path", [PATH_REGISTER, PATH_CHUNKS, PATH_HEARTBEAT])
def test_names_outside_the_rule_get_400_on_every_request(tmp_path, tls, caplog, name, path):
    """Was: ``nöde`` made every chunk fail with 500 forever. The name goes as its UTF-8 bytes
    (a raw client: aiohttp's own refuses to send them)."""
    async def scenario():
        async with guarded(settings(tmp_path), tls) as g:
            signed = sign(KEY, "POST", path, b"{}", "placeholder")
            signed["X-Ossensor-Sensor"] = name.encode()
            reader, writer = await g.open()
            writer.write(request_head("POST", path, signed, 2) + b"{}")
            answer = await response(reader)
            writer.close()
            return answer

    caplog.set_level(logging.INFO)
    status, answer = run(scenario())
    if name == "":
        assert (status, answer["error"]) in ((400, "bad_sensor_name"), (401, "missing_header"))
    else:
        assert (status, answer["error"]) == (400, "bad_sensor_name")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not (tmp_path / "data" / name).exists() or name in ("", "..")
