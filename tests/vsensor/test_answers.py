"""What the vSensor answers: reason codes and its clock on refusals, unknown sensors, test
chunks."""

from __future__ import annotations

import asyncio
import json
import time

from ossensor_core.wire.names import H_SERVER_TIME, REASON_CODES
from ossensor_core.wire.signing import PATH_CHUNKS, PATH_HEARTBEAT, sign
from tests.helpers.vsensor import KEY, SENSOR, make_chunk, running, settings, stored_files


def run(coro):
    return asyncio.run(coro)


def test_401_answers_carry_a_reason_code_and_the_vsensor_time(tmp_path, tls):
    offset = -1000.0  # the vSensor's clock is late: its time in the answer must say so

    async def scenario():
        async with running(settings(tmp_path, clock_offset=offset), tls) as client:
            now = time.time() + offset
            seq = {"X-Ossensor-Chunk-Sequence": "1"}
            cases = {}
            body = client.codec.encode(make_chunk(1))
            headers = sign(KEY, "POST", PATH_CHUNKS, body, SENSOR, now=now)
            missing = {k: v for k, v in headers.items() if k != "X-Ossensor-Nonce"}
            cases["missing_header"] = (body, missing)
            cases["bad_scheme"] = (body, {**headers, "Authorization": "Basic abc"})
            cases["bad_timestamp"] = (body, {**headers, "X-Ossensor-Timestamp": "soon"})
            cases["clock_skew"] = (body, sign(KEY, "POST", PATH_CHUNKS, body, SENSOR))
            cases["bad_body_hash"] = (body + b"x", headers)
            cases["bad_signature"] = (body, sign("wrong-key", "POST", PATH_CHUNKS, body,
                                                 SENSOR, now=now))
            for code, (payload, signed) in cases.items():
                status, answer, answer_headers = await client.post(PATH_CHUNKS, payload,
                                                                   signed=signed, headers=seq)
                assert status == 401, code
                assert set(answer) == {"error", "server_time"}, answer
                assert answer["error"] == code and code in REASON_CODES
                assert abs(answer["server_time"] - (time.time() + offset)) < 30
                assert abs(float(answer_headers[H_SERVER_TIME]) - answer["server_time"]) < 5
                assert KEY not in json.dumps(answer)
            # A replay: the genuine request first (409: not registered, but authenticated).
            _, answer, _ = await client.post(PATH_CHUNKS, body, signed=headers, headers=seq)
            assert answer["error"] == "unknown_sensor"
            status, answer, _ = await client.post(PATH_CHUNKS, body, signed=headers, headers=seq)
            assert (status, answer["error"]) == (401, "replay")
            assert stored_files(tmp_path / "data") == []
            failures = client.vsensor.metrics.auth_failures
            # name_in_use needs two live instances: see the test of duplicate names below;
            # bad_chunk is a 400, counted with the chunks (malformed), not an auth failure.
            assert set(failures) == set(REASON_CODES) - {"name_in_use", "bad_chunk"}
    run(scenario())


def test_every_answer_carries_the_server_time(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, client_max_size=1 << 16), tls) as client:
            answers = [await client.register(),
                       await client.send_chunk(make_chunk(1)),
                       await client.post(PATH_CHUNKS, b"garbage",
                                         headers={"X-Ossensor-Chunk-Sequence": "2"}),
                       await client.post(PATH_CHUNKS, bytes(1 << 17))]
            assert [status for status, _, _ in answers] == [200, 200, 400, 413]
            async with client.session.get(client.base + "/status.json") as r:
                answers.append((r.status, None, r.headers))
            async with client.session.get(client.base + "/no-such-page") as r:
                answers.append((r.status, None, r.headers))
            for status, _, headers in answers:
                assert abs(float(headers[H_SERVER_TIME]) - time.time()) < 30, status
    run(scenario())


def test_an_unregistered_sensor_is_told_to_register_again(tmp_path, tls):
    data = tmp_path / "data"
    beat = json.dumps({"interfaces": {"eth0": {"packets": 1, "drops": 0}}}).encode()

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            for answer in (await client.send_chunk(make_chunk(1)),
                           await client.post(PATH_HEARTBEAT, beat)):
                status, body, _ = answer
                assert status == 409
                assert body["error"] == "unknown_sensor"
                assert abs(body["server_time"] - time.time()) < 30
            assert stored_files(data) == []
            assert client.vsensor.sensors[SENSOR].kernel == {}  # the heartbeat was not taken
            assert (await client.register())[0] == 200
            assert (await client.send_chunk(make_chunk(1)))[:2] == (200, {"stored": 3})
            assert (await client.post(PATH_HEARTBEAT, beat))[0] == 200
            # Another sensor is still unknown.
            status, body, _ = await client.send_chunk(make_chunk(2, sensor="node-2"))
            assert (status, body["error"]) == (409, "unknown_sensor")
        # A restarted vSensor knows nobody: the sensor must register again.
        async with running(settings(tmp_path), tls) as client:
            status, body, _ = await client.send_chunk(make_chunk(3))
            assert (status, body["error"]) == (409, "unknown_sensor")
            assert (await client.register())[0] == 200
            assert (await client.send_chunk(make_chunk(3)))[:2] == (200, {"stored": 3})
    run(scenario())
    assert len(stored_files(data)) == 2
    assert not (data / "node-2").exists()


def test_a_test_chunk_is_verified_and_decoded_but_not_stored(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register())[0] == 200
            test = {"X-Ossensor-Test": "1"}
            chunk = make_chunk(1, packets=4, raw_packets=1)
            assert (await client.send_chunk(chunk, headers_extra=test))[:2] == (
                200, {"test": True, "packets": 5})
            assert stored_files(tmp_path / "data") == []
            state = client.vsensor.sensors[SENSOR]
            assert (state.packets, state.chunks, state.duplicates) == (0, 0, 0)
            # Verified: a wrong key or a malformed body still fail. No registration is needed
            # (ossensor diagnose sends one before any sensor ran, and only probes registration).
            assert (await client.send_chunk(make_chunk(2), key="wrong",
                                            headers_extra=test))[0] == 401
            status, answer, _ = await client.post(
                PATH_CHUNKS, client.codec.encode(make_chunk(3))[:-3],
                headers={"X-Ossensor-Chunk-Sequence": "3", **test})
            assert (status, answer["error"]) == (400, "bad_chunk") and "malformed" in answer["detail"]
            assert (await client.send_chunk(make_chunk(4, sensor="node-2"),
                                            headers_extra=test))[:2] == (
                200, {"test": True, "packets": 3})
            assert stored_files(tmp_path / "data", "node-2") == []
            # The same sequence sent for real afterwards is stored, not a "duplicate".
            assert (await client.send_chunk(chunk))[:2] == (200, {"stored": 5})
            assert (await client.send_chunk(chunk, headers_extra=test))[:2] == (
                200, {"test": True, "packets": 5})
            assert state.chunks == 1 and client.vsensor.metrics.chunks["test"] == 3
            await client.shutdown()
        assert len(stored_files(tmp_path / "data")) == 2  # ether and raw, from the real chunk
    run(scenario())


def test_two_live_sensors_with_one_name_are_reported_not_merged(tmp_path, tls, caplog):
    """A second instance (another process) under a live name is refused with 409 name_in_use,
    shown on the status, and takes the name over once the first falls silent."""
    first, second = "a" * 32, "b" * 32
    beat = json.dumps({"interfaces": {}}).encode()

    async def scenario():
        async with running(settings(tmp_path, heartbeat_seconds=0.3), tls) as client:
            assert (await client.register(instance=first))[0] == 200
            assert (await client.send_chunk(make_chunk(1), headers_extra={
                "X-Ossensor-Instance": first}))[:2] == (200, {"stored": 3})
            status, body, _ = await client.register(instance=second)
            assert (status, body["error"]) == (409, "name_in_use")
            status, body, _ = await client.send_chunk(make_chunk(2), headers_extra={
                "X-Ossensor-Instance": second})
            assert (status, body["error"]) == (409, "name_in_use")
            status, body, _ = await client.post(PATH_HEARTBEAT, beat,
                                                headers={"X-Ossensor-Instance": second})
            assert (status, body["error"]) == (409, "name_in_use")
            shown = client.vsensor.sensors[SENSOR].as_json()
            assert shown["instance"] == first and shown["name_conflict"]["instance"] == second
            assert shown["packets"] == 3  # nothing of the second instance was stored
            # The refused requests did not keep the first instance "alive": after three
            # heartbeats of silence the second takes the name over.
            await asyncio.sleep(1.0)
            assert (await client.register(instance=second))[0] == 200
            assert (await client.send_chunk(make_chunk(3), headers_extra={
                "X-Ossensor-Instance": second}))[0] == 200
            status, body, _ = await client.send_chunk(make_chunk(4), headers_extra={
                "X-Ossensor-Instance": first})
            assert (status, body["error"]) == (409, "name_in_use")
            assert "name_in_use" in (await client.get("/metrics"))[1]
    run(scenario())
    assert "two sensors with one name" in caplog.text
