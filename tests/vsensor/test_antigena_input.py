"""Antigena input on the vSensor (issue 16, item 1), over real TLS: plain networks only, times
that are finite and bounded, a start, no action that cuts the sensors' own connections to the
vSensor, a cap on actions in force, and the operator CLI pinning the certificate."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import sys
import time

import trustme
from ossensor_vsensor.antigena import ANTIGENA

from ossensor_core.wire.antigena import MAX_ACTIONS_IN_FORCE
from ossensor_core.wire.names import PATH_ACTIONS
from ossensor_core.wire.signing import H_VERSION, PATH_ANTIGENA, sign
from tests.helpers.vsensor import KEY, SENSOR, running, settings

TOKEN = "operator-token-7f3a-input"


async def post_raw(client, text: str) -> tuple[int, dict]:
    """An operator POST with a body as written (``NaN`` is what Python's json would send)."""
    async with client.session.post(client.base + PATH_ACTIONS, data=text.encode(),
                                   headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json(content_type=None)


async def block(client, **body) -> tuple[int, dict]:
    return await post_raw(client, json.dumps(body))


def test_addresses_and_times_are_refused_with_a_reason_code(tmp_path, tls):
    cases = [
        ('{"dst": "fe80::1%eth0", "duration": 5}', "has a scope id"),
        ('{"src": "fe80::1%25eth0/128", "duration": 5}', "has a scope id"),
        ('{"dst": "10.1.2.3/8", "duration": 5}', "has host bits set (the network is 10.0.0.0/8)"),
        ('{"dst": "2001:db8::1/32", "duration": 5}', "has host bits set"),
        ('{"dst": "192.0.2.7", "duration": NaN}', "duration must be a finite number"),
        ('{"dst": "192.0.2.7", "duration": Infinity}', "duration must be a finite number"),
        ('{"dst": "192.0.2.7", "duration": 1e308}', "longer than 2592000 s"),
        ('{"dst": "192.0.2.7", "duration": -5}', "must be greater than 0"),
        ('{"dst": "192.0.2.7", "duration": 5, "start_in": -1}', "start_in -1 must be from 0"),
        ('{"dst": "192.0.2.7", "duration": 5, "start_in": NaN}', "start_in must be a finite"),
        ('{"dst": "192.0.2.7", "duration": 5, "start_in": 1e12}', "start_in 1e+12 must be"),
        ('{"dst": "' + "1" * 5000 + '", "duration": 5}', "is not an IP address or CIDR"),
    ]

    async def scenario():
        async with running(settings(tmp_path, admin_token=TOKEN), tls) as client:
            for text, message in cases:
                status, answer = await post_raw(client, text)
                assert status == 400, text
                assert answer["reason"] == "bad_action", answer
                assert message in answer["error"], (text, answer)
                assert len(answer["error"]) <= 300
            status, answer = await block(client, dst="192.0.2.7", duration=5, start_in=30)
            assert status == 201, answer
            action = answer["action"]
            assert 29 < action["start"] - time.time() < 31
            assert action["expiry"] - action["start"] == 5
    asyncio.run(scenario())


def test_an_action_that_cuts_the_sensors_connection_is_refused(tmp_path, tls):
    async def scenario():
        vsettings = settings(tmp_path, admin_token=TOKEN, direct=("198.51.100.9", 9443))
        async with running(vsettings, tls) as client:
            status, _, _ = await client.register(addresses=["192.0.2.10"])
            assert status == 200
            port = int(client.base.rsplit(":", 1)[1])
            for body, where in (({"dst": "127.0.0.1"}, "127.0.0.1 port 443"),  # --sensor-port
                                ({"dst": "127.0.0.0/8", "dport": port}, "127.0.0.1 port"),
                                ({"src": "127.0.0.1", "sport": port}, "127.0.0.1 port"),
                                ({"src": "127.0.0.1", "dst": "127.0.0.1"}, "127.0.0.1 port"),
                                ({"dst": "198.51.100.9"}, "198.51.100.9 port 9443"),
                                ({"dst": "198.51.100.0/24", "dport": 9443},
                                 "198.51.100.9 port 9443")):
                status, answer = await block(client, duration=5, **body)
                assert status == 400, body
                assert answer["reason"] == "cuts_vsensor", answer
                assert where in answer["error"], answer
            # Other ports of the vSensor's host, or other hosts, are fine.
            for body in ({"dst": "127.0.0.1", "dport": 22}, {"dst": "198.51.100.9", "dport": 80},
                         {"src": "203.0.113.5", "dst": "127.0.0.1"}):
                status, answer = await block(client, duration=5, **body)
                assert status == 201, (body, answer)
            # The sensor learns the endpoints it must never block.
            headers = {H_VERSION: "1", **sign(KEY, "GET", PATH_ANTIGENA, b"", SENSOR)}
            ws = await client.session.ws_connect(client.base + PATH_ANTIGENA, headers=headers)
            sync = json.loads((await asyncio.wait_for(ws.receive(), 2)).data)
            assert {"host": "198.51.100.9", "port": 9443} in sync["vsensor"]
            assert {"host": "127.0.0.1", "port": port} in sync["vsensor"]
            await ws.close()
    asyncio.run(scenario())


def test_actions_in_force_are_capped_per_sensor(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, admin_token=TOKEN), tls) as client:
            await client.register(addresses=["192.0.2.10"])
            await client.register("node-2", addresses=["192.0.2.11"])
            ids = []
            for n in range(MAX_ACTIONS_IN_FORCE - 1):
                status, answer = await block(client, dst=f"203.0.113.{n}", duration=60)
                assert status == 201, answer
                ids.append(answer["id"])
            status, answer = await block(client, dst="198.51.100.1", duration=60,
                                         sensor="node-2")
            assert status == 201
            # node-2 is full (39 for every sensor + 1 for it); node-1 has room for one more.
            status, answer = await block(client, dst="198.51.100.2", duration=60)
            assert status == 409 and answer["reason"] == "too_many_actions", answer
            assert f"at most {MAX_ACTIONS_IN_FORCE}" in answer["error"]
            status, _ = await block(client, dst="198.51.100.3", duration=60, sensor=SENSOR)
            assert status == 201
            status, answer = await block(client, dst="198.51.100.4", duration=60, sensor=SENSOR)
            assert status == 409 and "for node-1" in answer["error"]
            async with client.session.delete(f"{client.base}{PATH_ACTIONS}/{ids[0]}", headers={
                    "Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
            status, _ = await block(client, dst="198.51.100.4", duration=60, sensor=SENSOR)
            assert status == 201
    asyncio.run(scenario())


def test_operator_cli_pins_the_certificate_fingerprint(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    digest = hashlib.sha256(der).hexdigest()
    pin = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSENSOR_")}
    env["VSENSOR_ADMIN_TOKEN"] = TOKEN

    async def cli(url: str, *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ossensor_vsensor.cli", "antigena", "--url", url, *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        return process.returncode or 0, out.decode(), err.decode()

    async def scenario():
        async with running(settings(tmp_path, admin_token=TOKEN), (server, client_ctx)) as c:
            # No --ca-file: the pin alone is the check (the test CA is no system CA).
            code, out, err = await cli(c.base, "--fingerprint", pin, "block", "--dst",
                                       "192.0.2.7", "--duration", "60", "--start-in", "5")
            assert code == 0, err
            action_id = out.strip()
            code, out, err = await cli(c.base, "--fingerprint", digest.lower(), "list",
                                       "--json")
            assert code == 0 and [a["id"] for a in json.loads(out)] == [action_id], err
            wrong = "AB" + pin[2:]
            code, out, err = await cli(c.base, "--fingerprint", wrong, "block", "--dst",
                                       "192.0.2.8", "--duration", "60")
            assert code == 1 and out == ""
            assert f"has fingerprint {pin}, not the one given with --fingerprint" in err
            assert "Traceback" not in err and TOKEN not in err
            for bad in ("SHA-256", "", "zz" * 32):
                code, _, err = await cli(c.base, "--fingerprint", bad, "list")
                assert code == 1 and "--fingerprint" in err and "Traceback" not in err, err
            for duration in ("nan", "inf", "-inf"):
                code, _, err = await cli(c.base, "--fingerprint", pin, "block", "--dst",
                                         "192.0.2.9", "--duration", duration)
                assert code == 1 and "--duration" in err and "Traceback" not in err, err
            code, _, err = await cli(c.base, "--fingerprint", pin, "block", "--dst",
                                     "fe80::1%eth0", "--duration", "5")
            assert code == 1 and "refused (400): dst 'fe80::1%eth0' has a scope id" in err
            # Only the first action was ever made: the wrong pin sent nothing.
            assert [a.id for a in c.app[ANTIGENA].in_force()] == [action_id]
    asyncio.run(scenario())
