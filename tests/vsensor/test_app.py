"""The vSensor application over real TLS: registration, chunks, authentication, status."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess

import pytest

from ossensor_core.wire.signing import PATH_CHUNKS, PATH_HEARTBEAT, sign
from tests.helpers.vsensor import (KEY, SENSOR, make_chunk, running, settings,
                                   stored_files)


def run(coro):
    return asyncio.run(coro)


def test_registration_negotiates_version_and_hands_out_the_filter(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, heartbeat_seconds=7.0), tls) as client:
            status, answer, _ = await client.register(addresses=["192.0.2.10", "172.17.0.1"])
            assert status == 200, answer
            assert answer["version"] == 1
            assert answer["heartbeat_seconds"] == 7.0
            assert abs(answer["server_time"] - __import__("time").time()) < 60
            port = int(client.base.rsplit(":", 1)[1])
            assert answer["filter"].startswith("not (host 127.0.0.1 and (tcp port 443 or "
                                               f"tcp port {port}))")

            # A second sensor: each excludes packets *to* the other (stored once, by the
            # receiver); an address both have (docker0) is never excluded.
            status, answer, _ = await client.register(
                "node-2", addresses=["192.0.2.11", "172.17.0.1", "127.0.0.1"])
            assert status == 200
            assert "dst net 192.0.2.10/32" in answer["filter"]
            body = json.dumps({"interfaces": {"eth0": {"packets": 10, "drops": 2}}}).encode()
            status, beat, _ = await client.post(PATH_HEARTBEAT, body)
            assert status == 200
            assert "dst net 192.0.2.11/32" in beat["filter"]
            assert "172.17.0.1" not in beat["filter"] and "127.0.0.1/32" not in beat["filter"]
            assert client.vsensor.sensors[SENSOR].kernel == {"eth0": {"packets": 10, "drops": 2}}

            status, answer, _ = await client.register("node-3", versions=[7, 9])
            assert (status, answer) == (426, {"supported": [1]})

            # The body must name the authenticated sensor.
            body = json.dumps({"sensor": "node-9", "versions": [1]}).encode()
            status, _, _ = await client.post("/api/v1/register", body)
            assert status == 400
    run(scenario())


def test_filter_leaves_out_peers_beyond_the_kernel_limit():
    import ipaddress
    from ossensor_vsensor.filters import build_filter, self_expression
    nets = [ipaddress.ip_network(f"2001:db8:{i:x}::{i:x}/128") for i in range(700)]
    result = build_filter(self_expression("192.0.2.1", [443]), nets)
    assert result.peers_dropped and "4096" in result.reason
    assert result.expression == "not (host 192.0.2.1 and tcp port 443)"


def test_chunks_are_stored_as_pcapng_that_tcpdump_and_tshark_read(tmp_path, tls):
    data = tmp_path / "data"

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register())[0] == 200
            status, answer, _ = await client.send_chunk(make_chunk(1, packets=3, raw_packets=2))
            assert (status, answer) == (200, {"stored": 5})
            status, answer, _ = await client.send_chunk(make_chunk(2, packets=4))
            assert (status, answer) == (200, {"stored": 4})
            # A retry of chunk 2 after a lost answer is recognised, not stored twice.
            status, answer, _ = await client.send_chunk(make_chunk(2, packets=4))
            assert (status, answer) == (200, {"duplicate": True})
            assert all(p.name.endswith(".pcapng.part") for p in stored_files(data))
            state = client.vsensor.sensors[SENSOR]
            assert (state.packets, state.chunks, state.duplicates) == (9, 2, 1)
            await client.shutdown()  # completes the files
    run(scenario())

    files = stored_files(data)
    assert [p.name.rsplit("-", 1)[1] for p in files] == ["ether.pcapng", "raw.pcapng"]
    counts = {}
    for path in files:
        if shutil.which("tcpdump"):
            out = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True,
                                 check=True).stdout
            counts[path.name.rsplit("-", 1)[1]] = len(out.splitlines())
    if counts:
        assert counts == {"ether.pcapng": 7, "raw.pcapng": 2}
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(files[0]), "-T", "fields", "-e",
                              "frame.interface_name"], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == ["eth0"] * 7


def test_files_rotate_by_size_and_by_age(tmp_path, tls):
    data = tmp_path / "data"

    async def scenario():
        async with running(settings(tmp_path, rotate_bytes=1), tls) as client:
            assert (await client.register())[0] == 200
            for sequence in (1, 2):
                assert (await client.send_chunk(make_chunk(sequence)))[0] == 200
            assert [p.suffix for p in stored_files(data)] == [".pcapng", ".pcapng"]
        shutil.rmtree(data)
        async with running(settings(tmp_path, rotate_seconds=0.3), tls) as client:
            assert (await client.register())[0] == 200
            assert (await client.send_chunk(make_chunk(1)))[0] == 200
            assert [p.suffix for p in stored_files(data)] == [".part"]
            for _ in range(40):
                await asyncio.sleep(0.05)
                if [p.suffix for p in stored_files(data)] == [".pcapng"]:
                    break
            assert [p.suffix for p in stored_files(data)] == [".pcapng"]
    run(scenario())


def test_malformed_chunks_and_foreign_sensor_names_get_400(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register())[0] == 200
            status, answer, _ = await client.post(
                PATH_CHUNKS, b"OSCKgarbage", headers={"X-Ossensor-Chunk-Sequence": "1"})
            assert (status, answer["error"]) == (400, "bad_chunk") and "malformed" in answer["detail"]
            status, _, _ = await client.send_chunk(make_chunk(1, sensor="node-2"),
                                                   sensor=SENSOR)
            assert status == 400
            assert stored_files(tmp_path / "data") == []
    run(scenario())


def test_authentication_failures_get_401_and_store_nothing(tmp_path, tls, caplog):
    caplog.set_level(logging.WARNING)

    async def scenario():
        async with running(settings(tmp_path, clock_offset=0.0), tls) as client:
            assert (await client.register())[0] == 200
            status, answer, _ = await client.send_chunk(make_chunk(1), key="wrong-key")
            assert status == 401 and answer["error"] == "bad_signature"

            stale = __import__("time").time() - 1000
            status, answer, _ = await client.send_chunk(make_chunk(2), now=stale)
            assert status == 401 and answer["error"] == "clock_skew"

            body = client.codec.encode(make_chunk(3))
            headers = sign(KEY, "POST", PATH_CHUNKS, body, SENSOR)
            status, answer, _ = await client.post(PATH_CHUNKS, body[:-1] + b"\0", signed=headers,
                                             headers={"X-Ossensor-Chunk-Sequence": "3"})
            assert status == 401 and answer["error"] == "bad_body_hash"  # tampered body
            status, _, _ = await client.post(PATH_CHUNKS, body, signed=headers,
                                             headers={"X-Ossensor-Chunk-Sequence": "3"})
            assert status == 200  # the genuine request (its nonce was not burnt)
            status, answer, _ = await client.post(PATH_CHUNKS, body, signed=headers,
                                                  headers={"X-Ossensor-Chunk-Sequence": "3"})
            assert status == 401 and answer["error"] == "replay"
            assert client.vsensor.metrics.auth_failures == {
                "bad_signature": 1, "clock_skew": 1, "bad_body_hash": 1, "replay": 1}
            assert client.vsensor.sensors[SENSOR].chunks == 1
        # The vSensor's clock runs late: a sensor with a right clock is refused.
        async with running(settings(tmp_path, clock_offset=-600.0), tls) as client:
            status, answer, _ = await client.send_chunk(make_chunk(4))
            assert status == 401 and answer["error"] == "clock_skew"
            assert client.vsensor.sensors == {}
    run(scenario())
    text = caplog.text
    assert "does not match any accepted key" in text and "replay" in text
    assert KEY not in text and "wrong-key" not in text


def test_nothing_is_stored_after_an_auth_failure(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.send_chunk(make_chunk(1), key="wrong"))[0] == 401
        assert stored_files(tmp_path / "data") == []
    run(scenario())


def test_two_keys_are_accepted_during_a_rotation(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, keys=["old-key-1234", KEY]), tls) as client:
            assert (await client.register(key="old-key-1234"))[0] == 200
            assert (await client.send_chunk(make_chunk(1), key="old-key-1234"))[0] == 200
            assert (await client.send_chunk(make_chunk(2), key=KEY))[0] == 200
            assert (await client.send_chunk(make_chunk(3), key="third-key"))[0] == 401
    run(scenario())


def test_unwritable_data_dir_gets_507_then_recovers(tmp_path, tls, caplog):
    data = tmp_path / "data"
    data.mkdir()
    (data / SENSOR).write_text("a file where the sensor's folder should be")

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register())[0] == 200
            status, answer, headers = await client.send_chunk(make_chunk(1))
            assert status == 507 and headers["Retry-After"] == "5"
            assert "cannot store" in answer["error"]
            assert client.vsensor.sensors[SENSOR].packets == 0
            (data / SENSOR).unlink()
            status, answer, _ = await client.send_chunk(make_chunk(1))
            assert (status, answer) == (200, {"stored": 3})  # the retry is not a "duplicate"
    run(scenario())
    assert "cannot store chunk 1" in caplog.text


@pytest.mark.parametrize("token", [None, "admin-secret-token"])
def test_status_pages_show_no_key_and_honour_the_admin_token(tmp_path, tls, token):
    async def scenario():
        async with running(settings(tmp_path, admin_token=token), tls) as client:
            await client.register()
            await client.send_chunk(make_chunk(1))
            await client.send_chunk(make_chunk(2), key="wrong-key")
            for path in ("/status", "/status.json", "/metrics"):
                if token:
                    assert (await client.get(path))[0] == 401
                    assert (await client.get(path, token="not-it"))[0] == 401
                status, text = await client.get(path, token=token)
                assert status == 200, path
                assert KEY not in text and "wrong-key" not in text
                assert token is None or token not in text
                assert SENSOR in text
            status, text = await client.get("/status.json", token=token)
            (sensor,) = json.loads(text)["sensors"]
            assert (sensor["name"], sensor["packets"], sensor["chunks"]) == (SENSOR, 3, 1)
            assert sensor["addresses"] == ["192.0.2.10"] and sensor["registered"]
            status, text = await client.get("/metrics", token=token)
            assert 'ossensor_vsensor_auth_failures_total{reason="bad_signature"} 1' in text
            assert ('ossensor_vsensor_requests_total{endpoint="/api/v1/chunks",status="200"} 1'
                    in text)
            assert "ossensor_vsensor_packets_stored_total 3" in text
    run(scenario())


def test_bodies_over_the_limit_get_413(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, client_max_size=1 << 16), tls) as client:
            status, _, _ = await client.post(PATH_CHUNKS, bytes(1 << 17),
                                             headers={"X-Ossensor-Chunk-Sequence": "1"})
            assert status == 413
            assert stored_files(tmp_path / "data") == []
    run(scenario())


def test_ipv6_listener_filter_names_the_ipv6_address(tmp_path, tls):
    import socket

    import aiohttp
    from aiohttp import web
    from ossensor_vsensor.app import create_app
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6")

    async def scenario():
        runner = web.AppRunner(create_app(settings(tmp_path, vsensor_ports=(8443,))))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "::1", 0)  # plain HTTP: the filter logic is the point
            try:
                await site.start()
            except OSError:
                pytest.skip("cannot listen on ::1")
            port = runner.addresses[0][1]
            body = json.dumps({"sensor": SENSOR, "versions": [1],
                               "addresses": ["2001:db8::10"]}).encode()
            headers = sign(KEY, "POST", "/api/v1/register", body, SENSOR)
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://[::1]:{port}/api/v1/register", data=body,
                                        headers=headers) as response:
                    answer = await response.json()
            assert answer["filter"] == (f"not (host ::1 and (tcp port 8443 or tcp port {port}))")
        finally:
            await runner.cleanup()
    run(scenario())
