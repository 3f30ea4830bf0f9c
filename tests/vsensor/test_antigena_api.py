"""Antigena on the vSensor over real TLS: the operator API, its own token, validation, the
sensors' websocket (actions pushed, sync on reconnect, reports), and the operator CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import aiohttp
import trustme

from ossensor_core.wire.names import PATH_ACTIONS
from ossensor_core.wire.signing import H_VERSION, PATH_ANTIGENA, sign
from tests.helpers.operator import TOKEN, connect, operator, receive
from tests.helpers.vsensor import KEY, SENSOR, running, settings


def run(coro):
    return asyncio.run(coro)


def test_operator_api_needs_the_admin_token_never_the_sensor_key(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:  # no admin token configured
            status, answer = await operator(client, "POST", body={"dst": "192.0.2.7",
                                                                   "duration": 10})
            assert status == 403 and "VSENSOR_ADMIN_TOKEN" in answer["error"]
        async with running(settings(tmp_path, admin_token=TOKEN), tls) as client:
            body = {"dst": "192.0.2.7", "duration": 10}
            for token in (None, "wrong-token"):
                status, _ = await operator(client, "POST", body=body, token=token)
                assert status == 401
            # A host holding the sensors' key signs the request like a sensor would: refused.
            raw = json.dumps(body).encode()
            status, _ = await operator(client, "POST", body=body, token=None,
                                       headers={H_VERSION: "1", **sign(KEY, "POST",
                                                                       PATH_ACTIONS, raw,
                                                                       SENSOR)})
            assert status == 401
            status, _ = await operator(client, "POST", body=body, token=KEY)
            assert status == 401
            assert (await operator(client, "GET"))[1]["actions"] == []
            status, answer = await operator(client, "POST", body=body)
            assert status == 201, answer
            assert answer["id"].startswith("ag-")
            assert answer["action"]["dst"] == "192.0.2.7/32"
            assert answer["action"]["expiry"] - answer["action"]["start"] == 10
    run(scenario())


def test_invalid_actions_are_refused_with_a_clear_message(tmp_path, tls):
    cases = [
        ({"src": "300.1.2.3", "duration": 5}, "src '300.1.2.3' is not an IP address or CIDR"),
        ({"dst": "192.0.2.7", "dport": 70000, "duration": 5},
         "dport 70000 is out of range (1-65535)"),
        ({"dst": "192.0.2.7", "dport": 0, "duration": 5}, "dport 0 is out of range"),
        ({"dst": "192.0.2.7", "duration": 0}, "duration 0 must be greater than 0"),
        ({"dst": "192.0.2.7", "duration": 5, "sensor": "node-9"},
         "unknown sensor 'node-9' (known: node-1)"),
        ({"dport": 22, "duration": 5}, "give a source (src) or a destination (dst)"),
        ({"src": "192.0.2.1", "dst": "2001:db8::1", "duration": 5}, "same IP version"),
        ({"dst": "192.0.2.7", "duration": 5, "port": 1}, "unknown field 'port'"),
        ("block everything", "must be a JSON object"),
    ]

    async def scenario():
        async with running(settings(tmp_path, admin_token=TOKEN), tls) as client:
            status, _, _ = await client.register()
            assert status == 200
            for body, message in cases:
                status, answer = await operator(client, "POST", body=body)
                assert status == 400, body
                assert message in answer["error"], (body, answer)
            assert (await operator(client, "GET"))[1]["actions"] == []
            status, answer = await operator(client, "DELETE", PATH_ACTIONS + "/ag-nosuch")
            assert status == 404 and "no action 'ag-nosuch'" in answer["error"]
            # A CIDR with host bits is refused (issue 16: plain networks only); a known sensor
            # is accepted.
            status, answer = await operator(client, "POST", body={
                "src": "198.51.100.7/24", "dport": "8080", "duration": 5, "sensor": SENSOR})
            assert status == 400 and answer["reason"] == "bad_action", answer
            assert "has host bits set (the network is 198.51.100.0/24)" in answer["error"]
            status, answer = await operator(client, "POST", body={
                "src": "198.51.100.0/24", "dport": "8080", "duration": 5, "sensor": SENSOR})
            assert status == 201, answer
            assert answer["action"]["src"] == "198.51.100.0/24"
            assert answer["action"]["dport"] == 8080
    run(scenario())


def test_websocket_pushes_actions_syncs_on_reconnect_and_collects_reports(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, admin_token=TOKEN), tls) as client:
            # The upgrade is authenticated like every sensor request.
            headers = {H_VERSION: "1", **sign("not-the-key", "GET", PATH_ANTIGENA, b"", SENSOR)}
            try:
                await client.session.ws_connect(client.base + PATH_ANTIGENA, headers=headers)
                raise AssertionError("a websocket with a bad signature was accepted")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401

            status, first = await operator(client, "POST", body={"dst": "192.0.2.7",
                                                                  "duration": 60})
            ws = await connect(client)
            sync = await receive(ws)
            assert sync["type"] == "sync"
            assert [a["id"] for a in sync["actions"]] == [first["id"]]

            started = time.monotonic()
            status, second = await operator(client, "POST", body={
                "src": "192.0.2.1", "dst": "192.0.2.2", "sport": 40000, "dport": 7100,
                "duration": 0.6})
            pushed = await receive(ws)
            assert time.monotonic() - started < 1.0
            assert pushed == {"type": "action", "action": second["action"]}
            # The same block again is the same action (its id comes back).
            status, again = await operator(client, "POST", body={"dst": "192.0.2.7",
                                                                  "duration": 30})
            assert status == 200 and again["id"] == first["id"] and again["duplicate"]
            # Another sensor's action does not reach this one.
            await client.register("node-2")
            status, other = await operator(client, "POST", body={"dst": "192.0.2.9",
                                                                  "duration": 60,
                                                                  "sensor": "node-2"})
            assert status == 201
            status, _ = await operator(client, "DELETE", f"{PATH_ACTIONS}/{first['id']}")
            assert status == 200
            assert await receive(ws) == {"type": "clear", "id": first["id"]}

            report = {"type": "report", "seq": 17, "actions": {
                second["id"]: {"connections": 1, "segments": 3, "resets": 6,
                               "first_hit": 1.0, "last_hit": 2.0, "enforcers": {"reset": 3}}},
                "rejected": [{"id": "x1", "reason": "dport 70000 is out of range"}]}
            for _ in range(2):  # a report sent again (its ack was lost) counts once
                await ws.send_json(report)
                assert await receive(ws) == {"type": "ack", "seq": 17}
            await ws.close()

            await asyncio.sleep(0.7)  # the short action expires
            status, page = await client.get("/status.json", TOKEN)
            state = json.loads(page)["antigena"]
            assert [a["id"] for a in state["actions"]] == [other["id"]]
            mine = state["sensors"][SENSOR]
            assert mine["connected"] is False and mine["reports"] == 1
            assert mine["actions"][second["id"]]["connections"] == 1
            assert mine["actions"][second["id"]]["resets"] == 6
            assert mine["rejections"] == 1
            assert mine["rejected"][0]["reason"] == "dport 70000 is out of range"
            status, html = await client.get("/status", TOKEN)
            assert "Antigena reports" in html and second["id"] in html

            ws = await connect(client)  # reconnecting: only what is still in force for it
            assert (await receive(ws))["actions"] == []
            assert client.vsensor.sensors[SENSOR].last_seen is not None
            await ws.close()
            assert KEY not in page and KEY not in html
    run(scenario())


def test_operator_cli_block_list_clear(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    import ssl
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSENSOR_")}

    async def cli(*args: str, token: str | None = TOKEN, ca: bool = True):
        command = [sys.executable, "-m", "ossensor_vsensor.cli", "antigena", "--url", url,
                   *(["--ca-file", str(ca_file)] if ca else []), *args]
        process = await asyncio.create_subprocess_exec(
            *command, env=dict(env, **({"VSENSOR_ADMIN_TOKEN": token} if token else {})),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        return process.returncode, out.decode(), err.decode()

    async def scenario():
        nonlocal url
        async with running(settings(tmp_path, admin_token=TOKEN), (server, client_ctx)) as c:
            url = c.base
            code, out, err = await cli("block", "--src", "192.0.2.1", "--dport", "7100",
                                       "--duration", "120")
            assert code == 0, err
            action_id = out.strip()
            assert action_id.startswith("ag-")
            code, out, err = await cli("list")
            assert code == 0, err
            assert out.splitlines()[0].split() == ["ID", "SRC", "DST", "SPORT", "DPORT",
                                                   "SENSOR", "EXPIRES", "IN"]
            assert action_id in out and "192.0.2.1/32" in out and "7100" in out
            code, out, _ = await cli("list", "--json")
            assert [a["id"] for a in json.loads(out)] == [action_id]

            code, _, err = await cli("block", "--dst", "192.0.2.7", "--dport", "99999",
                                     "--duration", "5")
            assert code == 1 and "dport 99999 is out of range (1-65535)" in err
            code, _, err = await cli("block", "--dst", "192.0.2.7", "--duration", "5",
                                     "--sensor", "ghost")
            assert code == 1 and "unknown sensor 'ghost'" in err
            code, _, err = await cli("list", token=None)
            assert code == 1 and "VSENSOR_ADMIN_TOKEN" in err
            code, _, err = await cli("list", token="wrong")
            assert code == 1 and "refused (401)" in err
            code, _, err = await cli("list", ca=False)  # the test CA is not a system CA
            assert code == 1 and "cannot reach the vSensor" in err

            code, out, err = await cli("clear", action_id)
            assert code == 0 and out.strip() == f"cleared {action_id}", err
            code, _, err = await cli("clear", action_id)
            assert code == 1 and f"no action {action_id!r} is in force" in err
            assert (await operator(c, "GET"))[1]["actions"] == []

    url = ""
    run(scenario())


def test_sensors_are_told_over_the_websocket_when_their_filter_changed(tmp_path, tls):
    """A new sensor registers: the connected sensors that can act on it (feature
    filter-refresh) get {"type": "filters"} at once; older sensors and the newcomer do not."""
    async def register(client, sensor: str, address: str, features: list[str]):
        body = json.dumps({"sensor": sensor, "versions": [1], "addresses": [address],
                           "features": features}).encode()
        status, _, _ = await client.post("/api/v1/register", body, sensor=sensor)
        assert status == 200

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            await register(client, "node-a", "192.0.2.1", ["peer-ranges", "filter-refresh"])
            await register(client, "node-old", "192.0.2.3", ["peer-ranges"])
            new_ws, old_ws = await connect(client, "node-a"), await connect(client, "node-old")
            for ws in (new_ws, old_ws):
                assert (await receive(ws))["type"] == "sync"
            started = time.monotonic()
            await register(client, "node-b", "192.0.2.2", ["peer-ranges", "filter-refresh"])
            assert (await receive(new_ws))["type"] == "filters"
            assert time.monotonic() - started < 1.0
            with contextlib.suppress(asyncio.TimeoutError):
                message = await receive(old_ws, timeout=0.5)
                raise AssertionError(f"a sensor without the feature got {message}")
            # The same registration again changes nothing: no message.
            await register(client, "node-b", "192.0.2.2", ["peer-ranges", "filter-refresh"])
            with contextlib.suppress(asyncio.TimeoutError):
                message = await receive(new_ws, timeout=0.5)
                raise AssertionError(f"an unchanged registration sent {message}")
            await new_ws.close()
            await old_ws.close()
    run(scenario())
