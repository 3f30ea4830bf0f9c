"""Antigena actions in force survive the vSensor: SIGKILL and start again on the same data folder,
and the blocks are still in force, listed, and sent to a sensor that connects (``sync``). A
change that cannot be written is not made; a file that is not ours stops start-up, named."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request

from ossensor_core.wire.names import PATH_ACTIONS
from ossensor_vsensor.action_store import ACTIONS_FILE
from tests.helpers.operator import TOKEN, connect, operator, receive
from tests.helpers.vsensor import KEY, running, settings
from tests.helpers.vsensor_process import VSENSOR, free_port, start_local

ENV = {"VSENSOR_HMAC_KEY": KEY, "VSENSOR_ADMIN_TOKEN": TOKEN}


def call(port: int, method: str, path: str = PATH_ACTIONS, body=None) -> tuple[int, dict]:
    """An operator request to a vSensor process (its certificate is self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_actions_survive_sigkill_and_expire_while_stopped(tmp_path):
    port = free_port()
    process = start_local(tmp_path, port, "first.log", env=ENV)
    try:
        status, kept = call(port, "POST", body={"dst": "192.0.2.7", "dport": 443,
                                                "duration": 3600})
        assert status == 201
        status, short = call(port, "POST", body={"src": "198.51.100.0/24", "duration": 1})
        assert status == 201
        status, cleared = call(port, "POST", body={"dst": "203.0.113.9", "duration": 3600})
        assert status == 201
        assert call(port, "DELETE", f"{PATH_ACTIONS}/{cleared['id']}")[0] == 200
        # Extending is a change too: the later expiry is what survives.
        status, extended = call(port, "POST", body={"dst": "192.0.2.7", "dport": 443,
                                                    "duration": 7200})
        assert status == 200 and extended["id"] == kept["id"]
    finally:
        process.send_signal(signal.SIGKILL)  # no clean stop: nothing is written at exit
        process.wait(timeout=10)
    # The one-second action expires while the vSensor is down.
    time.sleep(max(0.0, short["action"]["expiry"] - time.time() + 0.1))
    process = start_local(tmp_path, port, "second.log", env=ENV)
    try:
        status, listed = call(port, "GET")
        assert status == 200
        assert [a["id"] for a in listed["actions"]] == [kept["id"]], listed
        assert listed["actions"][0] == extended["action"]
        log = (tmp_path / "second.log").read_text()
        assert "1 Antigena actions in force loaded" in log and "1 expired" in log, log
        assert TOKEN not in log and KEY not in log
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_a_sensor_gets_the_surviving_actions_when_it_connects(tmp_path, tls):
    async def scenario():
        config = settings(tmp_path, admin_token=TOKEN)
        async with running(config, tls) as client:
            await client.register("node-2")
            status, everyone = await operator(client, "POST", body={"dst": "192.0.2.7",
                                                                     "duration": 60})
            status, targeted = await operator(client, "POST", body={
                "src": "192.0.2.1", "duration": 60, "sensor": "node-2"})
            assert status == 201, targeted
        async with running(config, tls) as client:  # a new process on the same folder
            ws = await connect(client, "node-2")
            sync = await receive(ws)
            assert sync["type"] == "sync"
            assert sorted(a["id"] for a in sync["actions"]) == \
                sorted([everyone["id"], targeted["id"]])
            assert {a["id"]: a for a in sync["actions"]}[targeted["id"]] == \
                targeted["action"]
            await ws.close()
            other = await connect(client)  # node-1: not the target of the second
            assert [a["id"] for a in (await receive(other))["actions"]] == [everyone["id"]]
            await other.close()

    asyncio.run(scenario())


def test_a_change_that_cannot_be_written_is_not_made(tmp_path, tls):
    async def scenario():
        config = settings(tmp_path, admin_token=TOKEN)
        async with running(config, tls) as client:
            status, first = await operator(client, "POST", body={"dst": "192.0.2.7",
                                                                  "duration": 60})
            assert status == 201
            # The temporary file's name taken by a folder: open() fails (root ignores modes).
            blocker = config.data_dir / (ACTIONS_FILE + ".tmp")
            blocker.mkdir()
            status, answer = await operator(client, "POST", body={"dst": "192.0.2.8",
                                                                   "duration": 60})
            assert status == 503 and answer["reason"] == "actions_not_saved", answer
            assert ACTIONS_FILE in answer["error"]
            status, answer = await operator(client, "DELETE", f"{PATH_ACTIONS}/{first['id']}")
            assert status == 503 and answer["reason"] == "actions_not_saved", answer
            status, listed = await operator(client, "GET")
            assert [a["id"] for a in listed["actions"]] == [first["id"]]
            blocker.rmdir()
            status, second = await operator(client, "POST", body={"dst": "192.0.2.8",
                                                                   "duration": 60})
            assert status == 201
        saved = json.loads((config.data_dir / ACTIONS_FILE).read_text())
        assert [a["id"] for a in saved["actions"]] == [first["id"], second["id"]]

    asyncio.run(scenario())


def refused_start(tmp_path, content: bytes) -> str:
    """Start the vSensor on a data folder whose actions file holds ``content``: its error."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / ACTIONS_FILE).write_bytes(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSENSOR_")}
    done = subprocess.run([*VSENSOR, "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                           str(data)], env={**env, **ENV}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert str(data / ACTIONS_FILE) in errors[0]
    return errors[0]


def test_an_actions_file_that_is_not_ours_stops_start_up_naming_it(tmp_path):
    assert "not JSON" in refused_start(tmp_path, b"\x00\xff{")
    assert "version" in refused_start(tmp_path, b'{"version": 9, "actions": []}')
    action = {"id": "ag-1", "kind": "block", "src": "fe80::1%eth0", "dst": None,
              "sport": None, "dport": None, "protocol": "tcp", "start": 1.0,
              "expiry": 4_000_000_000.0, "sensor": None}
    line = refused_start(tmp_path, json.dumps({"version": 1, "actions": [action]}).encode())
    assert "action 1" in line and "scope id" in line
    infinite = dict(action, src="192.0.2.7")
    line = refused_start(tmp_path, json.dumps({"version": 1, "actions": [infinite]})
                         .replace("4000000000.0", "Infinity").encode())
    assert "not JSON" in line
