"""Cluster mode's shared state (issue 18): two vSensor replicas (real aiohttp apps over real TLS
on loopback, and once two ``ossensor-vsensor --nats`` processes) sharing a real three-node
JetStream cluster; sensors simulated by signed requests.

Each test uses sensor names of its own: the NATS cluster (and so its buckets) is shared by the
module, except for the restart test, which has a cluster of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ossensor_core.wire.names import PATH_HEARTBEAT, PATH_REGISTER
from ossensor_core.wire.signing import sign
from ossensor_vsensor.antigena import ANTIGENA
from ossensor_vsensor.claims import DEFAULT_CLAIMS_ALLOW, ClaimPolicy, parse_allow
from ossensor_vsensor.cluster import names
from ossensor_vsensor.cluster.actions import parse_action
from ossensor_vsensor.cluster.connection import ClusterSettings
from ossensor_vsensor.cluster.nonces import nonce_key
from ossensor_vsensor.cluster.registry import MAX_RECORD_BYTES, parse_record
from ossensor_vsensor.cluster.replicas import parse_replica
from ossensor_vsensor.registry import SensorState
from tests.helpers.nats import nats_cluster, needs_nats
from tests.helpers.operator import TOKEN, connect, operator, receive
from tests.helpers.vsensor import KEY, Client, make_chunk, running, settings
from tests.helpers.vsensor_process import DOCUMENTATION_RANGES, free_port, start_local

pytestmark = needs_nats

CLAIMS = ClaimPolicy(parse_allow((*DEFAULT_CLAIMS_ALLOW, DOCUMENTATION_RANGES)), 16, 48)


@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    with nats_cluster(tmp_path_factory.mktemp("nats"), 3) as cluster:
        yield cluster


def replica_settings(tmp_path, urls: str, name: str, **changes):
    return settings(tmp_path / name, admin_token=TOKEN,
                    cluster=ClusterSettings(tuple(urls.split(",")), replicas=3, name=name),
                    **changes)


@contextlib.asynccontextmanager
async def replicas(tmp_path, urls: str, tls, **changes) -> AsyncIterator[tuple[Client, Client]]:
    """Replicas ``replica-a`` and ``replica-b``, started one after the other."""
    async with running(replica_settings(tmp_path, urls, "replica-a", **changes), tls) as a:
        async with running(replica_settings(tmp_path, urls, "replica-b", **changes),
                           tls) as b:
            yield a, b


async def register(client: Client, sensor: str, address: str, instance: str = "",
                   features=("peer-ranges",)):
    message = {"sensor": sensor, "versions": [1], "addresses": [address],
               "interfaces": ["eth0"], "features": list(features)}
    if instance:
        message["instance"] = instance
    return await client.post(PATH_REGISTER, json.dumps(message).encode(), sensor=sensor,
                             headers={"X-Ossensor-Instance": instance} if instance else None)


async def until(check, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        await asyncio.sleep(0.02)


def test_peer_ranges_span_replicas_and_status_lists_every_sensor(tmp_path, tls, nats):
    async def scenario():
        async with replicas(tmp_path, nats.urls, tls) as (a, b):
            status, first, _ = await register(a, "pr-a", "192.0.2.11",
                                              features=("peer-ranges", "filter-refresh"))
            assert status == 200 and first["peer_ranges"]["ranges"] == []
            ws = await connect(a, "pr-a")
            assert (await receive(ws))["type"] == "sync"
            status, _, _ = await register(b, "pr-b", "192.0.2.12")
            assert status == 200
            # A's sensor is told at once that its filter changed (a sensor joined on B).
            assert await receive(ws, timeout=1.0) == {"type": "filters"}
            await ws.close()
            await until(lambda: "pr-b" in a.vsensor.registry.remote, what="B's sensor on A")
            beat = json.dumps({"interfaces": {}, "peer_ranges_id": first["peer_ranges"]["id"]})
            status, answer, _ = await a.post(PATH_HEARTBEAT, beat.encode(), sensor="pr-a")
            assert status == 200
            assert "192.0.2.12" in answer["peer_ranges"]["ranges"], answer
            # And the other way round, on B.
            status, answer, _ = await register(b, "pr-b", "192.0.2.12")
            assert "192.0.2.11" in answer["peer_ranges"]["ranges"], answer
            # /status.json on A lists B's sensor, and which replica it talks to.
            status, text = await a.get("/status.json", TOKEN)
            page = json.loads(text)
            shown = {s["name"]: s.get("replica") for s in page["sensors"]}
            assert shown["pr-a"] == "replica-a" and shown["pr-b"] == "replica-b", shown
            assert {r["name"] for r in page["cluster"]["replicas"]} >= {"replica-a",
                                                                       "replica-b"}
            assert page["cluster"]["stream"] is not None
            status, text = await a.get("/status", TOKEN)
            assert status == 200 and "replica-b" in text and "pr-b" in text
            # /metrics: this replica's own series, labelled with it.
            status, text = await b.get("/metrics", TOKEN)
            assert 'sensor="pr-b"' in text and 'replica="replica-b"' in text
            assert 'sensor="pr-a"' not in text
            # A registration too large for the shared registry: 400, named, nothing written.
            huge = {"sensor": "pr-huge", "versions": [1], "addresses": ["192.0.2.13"],
                    "interfaces": [f"if{i:04d}" + "x" * 300 for i in range(1100)]}
            status, answer, _ = await a.post(PATH_REGISTER, json.dumps(huge).encode(),
                                             sensor="pr-huge")
            assert status == 400 and "shared registry" in answer["error"], answer

    asyncio.run(scenario())


def test_name_in_use_holds_across_replicas(tmp_path, tls, nats):
    async def scenario():
        async with replicas(tmp_path, nats.urls, tls) as (a, b):
            assert (await register(a, "niu", "192.0.2.21", instance="i" * 16))[0] == 200
            status, answer, _ = await register(b, "niu", "192.0.2.22", instance="j" * 16)
            assert (status, answer["error"]) == (409, "name_in_use")
            # The same instance moving to the other replica is welcome there.
            status, _, _ = await register(b, "niu", "192.0.2.21", instance="i" * 16)
            assert status == 200
            # Once it stops cleanly, another instance takes the name anywhere at once.
            beat = json.dumps({"leaving": True}).encode()
            assert (await b.post(PATH_HEARTBEAT, beat, sensor="niu",
                                 headers={"X-Ossensor-Instance": "i" * 16}))[0] == 200
            await asyncio.sleep(0.3)
            status, _, _ = await register(a, "niu", "192.0.2.22", instance="j" * 16)
            assert status == 200

    asyncio.run(scenario())


def test_a_request_replayed_to_the_other_replica_is_refused(tmp_path, tls, nats):
    async def scenario():
        async with replicas(tmp_path, nats.urls, tls) as (a, b):
            body = json.dumps({"sensor": "rp", "versions": [1],
                               "addresses": ["192.0.2.31"]}).encode()
            captured = sign(KEY, "POST", PATH_REGISTER, body, "rp")
            assert (await a.post(PATH_REGISTER, body, signed=captured))[0] == 200
            status, answer, _ = await b.post(PATH_REGISTER, body, signed=captured)
            assert (status, answer["error"]) == (401, "replay")
            assert b.vsensor.metrics.auth_failures["replay"] == 1
            # A chunk too, and new requests still pass on both.
            assert (await register(b, "rp", "192.0.2.31"))[0] == 200
            chunk_body = b.codec.encode(make_chunk(1, sensor="rp"))
            signed = sign(KEY, "POST", "/api/v1/chunks", chunk_body, "rp")
            headers = {"X-Ossensor-Chunk-Sequence": "1"}
            assert (await b.post("/api/v1/chunks", chunk_body, signed=signed,
                                 headers=headers))[0] == 200
            status, answer, _ = await a.post("/api/v1/chunks", chunk_body, signed=signed,
                                             headers=headers)
            assert (status, answer["error"]) == (401, "replay")

    asyncio.run(scenario())


def test_an_action_reaches_the_other_replicas_sensor_and_reports_count_once(tmp_path, tls,
                                                                            nats):
    async def scenario():
        async with replicas(tmp_path, nats.urls, tls) as (a, b):
            assert (await register(b, "ag-b", "192.0.2.41"))[0] == 200
            ws = await connect(b, "ag-b")
            assert (await receive(ws))["type"] == "sync"
            started = time.monotonic()
            status, issued = await operator(a, "POST", body={"dst": "198.51.100.7",
                                                             "duration": 600})
            assert status == 201, issued
            pushed = await receive(ws, timeout=1.0)
            assert time.monotonic() - started < 1.0
            assert pushed == {"type": "action", "action": issued["action"]}
            # Listed on B; cleared on B, the clear comes too.
            listed = (await operator(b, "GET"))[1]["actions"]
            assert [x["id"] for x in listed] == [issued["id"]]
            # A report seq sent to both replicas counts once over them.
            report = {"type": "report", "seq": 7, "actions": {issued["id"]: {
                "connections": 3, "resets": 2}}}
            await ws.send_json(report)
            assert (await receive(ws)) == {"type": "ack", "seq": 7}
            other = await connect(a, "ag-b")
            assert (await receive(other))["type"] == "sync"
            await other.send_json(report)
            assert (await receive(other)) == {"type": "ack", "seq": 7}
            counted = [c.app[ANTIGENA].sensors["ag-b"].reports for c in (a, b)]
            assert sorted(counted) == [0, 1], counted
            resets = sum(s.actions[issued["id"]].resets for c in (a, b)
                         for s in [c.app[ANTIGENA].sensors["ag-b"]]
                         if issued["id"] in s.actions)
            assert resets == 2
            # The status of either replica adds the replicas' own totals up (records written
            # every 5 s; written now so the test need not wait).
            for client in (a, b):
                await client.vsensor.shared.replicas.publish()
            mirror = b.vsensor.shared.replicas.replicas
            await until(lambda: sum(r["counters"]["antigena_reports"] for r in mirror.values()
                                    if r["name"] in ("replica-a", "replica-b")) == 1,
                        what="the replica records")
            page = json.loads((await b.get("/status.json", TOKEN))[1])
            mine = [r for r in page["cluster"]["replicas"]
                    if r["name"] in ("replica-a", "replica-b")]
            assert sum(r["counters"]["antigena_reports"] for r in mine) == 1, mine
            assert sum(r["counters"]["antigena_resets"] for r in mine) == 2, mine
            assert (await operator(b, "DELETE", f"/api/v1/antigena/actions/{issued['id']}"
                                   ))[0] == 200
            assert (await receive(other)) == {"type": "clear", "id": issued["id"]}
            await ws.close()
            await other.close()

    asyncio.run(scenario())


def test_actions_survive_both_replicas_and_a_full_nats_restart(tmp_path, tls):
    with nats_cluster(tmp_path / "nats", 3) as cluster:
        async def issue():
            async with replicas(tmp_path, cluster.urls, tls) as (a, _):
                status, issued = await operator(a, "POST", body={"src": "198.51.100.0/24",
                                                                 "duration": 3600})
                assert status == 201
                return issued

        async def listed():
            async with replicas(tmp_path, cluster.urls, tls) as (a, b):
                found = [(await operator(c, "GET"))[1]["actions"] for c in (a, b)]
                ws = await connect(b, "survivor")
                sync = await receive(ws)
                await ws.close()
                return found, sync

        issued = asyncio.run(issue())
        found, sync = asyncio.run(listed())  # both replicas restarted
        assert found == [[issued["action"]], [issued["action"]]]
        assert [x["id"] for x in sync["actions"]] == [issued["id"]]
        for i in range(3):  # the whole NATS cluster
            cluster.kill(i)
        for i in range(3):
            cluster.start(i)
        cluster.wait_ready()
        found, _ = asyncio.run(listed())
        assert found == [[issued["action"]], [issued["action"]]]

        async def failover():
            """One NATS server SIGKILLed at a time (each in turn, started again after): an
            action issued on A still reaches B's sensor. While JetStream elects new leaders the
            operator gets 503 and retries; a watch that fell silent is started again."""
            delays = []
            async with replicas(tmp_path, cluster.urls, tls) as (a, b):
                ws = await connect(b, "failover")
                assert (await receive(ws))["type"] == "sync"
                for i in range(3):
                    cluster.kill(i)
                    deadline = time.monotonic() + 60
                    while True:
                        status, issued = await operator(a, "POST", body={
                            "dst": f"203.0.113.{10 + i}", "duration": 600})
                        if status == 201:
                            break
                        assert status == 503 and time.monotonic() < deadline, issued
                        await asyncio.sleep(0.5)
                    taken = time.monotonic()
                    while (pushed := await receive(ws, timeout=30))["type"] != "action":
                        pass
                    assert pushed["action"]["id"] == issued["id"]
                    delays.append(round(time.monotonic() - taken, 1))
                    cluster.start(i)
                    await asyncio.to_thread(cluster.wait_ready)
                await ws.close()
            print(f"failover: pushed {delays} s after the operator's 201")
            # Bounded by JetStream's elections, not by the replicas: measured 0-3 s, and up to
            # 25 s when the meta leader was the one killed (a new watch cannot be made before).
            assert max(delays) < 45, delays

        asyncio.run(failover())

        async def without_nats():
            """No NATS at all: requests are refused with 503 and Retry-After, never taken
            unprotected; an operator's change is not made."""
            async with replicas(tmp_path, cluster.urls, tls) as (a, _):
                for i in range(3):
                    cluster.kill(i)
                status, answer, headers = await register(a, "no-nats", "192.0.2.71")
                assert (status, answer["error"]) == (503, "busy"), answer
                assert headers["Retry-After"] == "5"
                status, answer = await operator(a, "POST", body={"dst": "192.0.2.72",
                                                                 "duration": 60})
                assert (status, answer["reason"]) == (503, "actions_not_saved"), answer
                for i in range(3):
                    cluster.start(i)
                await asyncio.to_thread(cluster.wait_ready)
                await asyncio.sleep(2.0)
                # Back: taken again (the nonce of a new request).
                deadline = time.monotonic() + 30
                while (await register(a, "no-nats", "192.0.2.71"))[0] != 200:
                    assert time.monotonic() < deadline, "not taken after NATS came back"
                    await asyncio.sleep(0.5)

        asyncio.run(without_nats())


def test_values_planted_in_the_buckets_are_skipped_not_fatal(tmp_path, tls, nats, caplog):
    async def scenario():
        async with replicas(tmp_path, nats.urls, tls) as (a, b):
            cluster = a.vsensor.cluster
            sensors, actions = cluster.kv("ossensor-sensors"), cluster.kv("ossensor-actions")
            good = {"v": 1, "name": "planted", "replica": "evil", "instance": "",
                    "addresses": ["192.0.2.51"], "last_seen": time.time(),
                    "registered": time.time()}
            planted = [
                (sensors, names.token("garbage"), b"\xff{not json"),
                (sensors, names.token("huge"), b" " * (MAX_RECORD_BYTES + 10)),
                (sensors, names.token("types"), json.dumps({**good, "name": "types",
                                                            "addresses": [1, 2]}).encode()),
                (sensors, names.token("wrongname"), json.dumps(good).encode()),
                (sensors, names.token("nan"), json.dumps({**good, "name": "nan"})
                 .replace(str(good["last_seen"]), "NaN").encode()),
                (sensors, "not-a-token", json.dumps(good).encode()),
                (actions, "ag-evil", b"[1, 2, 3]"),
                (actions, "ag-other", json.dumps({"id": "ag-x", "src": "192.0.2.1/32",
                                                  "expiry": time.time() + 60}).encode()),
                (actions, "ag-huge", b"{" + b" " * 5000 + b"}"),
            ]
            with caplog.at_level(logging.WARNING, logger="ossensor_vsensor.cluster"):
                for kv, key, value in planted:
                    await kv.put(key, value)
                await sensors.put(names.token("planted"), json.dumps(good).encode())
                await until(lambda: "planted" in b.vsensor.registry.remote,
                            what="the good record")
            assert set(b.vsensor.registry.remote) & {"garbage", "huge", "types", "wrongname",
                                                      "nan"} == set()
            assert b.app[ANTIGENA].actions == {}
            skipped = [r.getMessage() for r in caplog.records if "skipped key" in r.getMessage()]
            assert len(skipped) >= 2 * len(planted) - 2, skipped  # both replicas, each once
            assert all(len(line) < 600 for line in skipped)
            # Both replicas still serve.
            assert (await register(a, "after-plant", "192.0.2.52"))[0] == 200
            # Store workers' records are shown when present, a bad one as an error.
            store = cluster.kv("ossensor-store")
            await store.put("worker.w1", json.dumps({"lag": 5, "stored": 9}).encode())
            await store.put("worker.w2", b"\xff garbage")
            page = json.loads((await b.get("/status.json", TOKEN))[1])
            workers = {w["worker"]: w for w in page["cluster"]["store_workers"]}
            assert workers["w1"] == {"worker": "w1", "lag": 5, "stored": 9}, workers
            assert "error" in workers["w2"] and len(workers["w2"]["error"]) <= 200, workers
            await store.delete("worker.w1")
            await store.delete("worker.w2")
            for kv, key, _ in planted:
                await kv.delete(key)
            await sensors.delete(names.token("planted"))

    asyncio.run(scenario())


def test_heartbeats_write_the_shared_record_every_other_beat_at_most(tmp_path, tls, nats):
    """What a steady sensor costs the bucket: with a 1 s heartbeat, 10 beats over 10 s write
    its record at most ``10 / 1.5`` times (measured, not every beat)."""
    async def scenario():
        async with replicas(tmp_path, nats.urls, tls, heartbeat_seconds=1.0) as (a, _):
            assert (await register(a, "beater", "192.0.2.61"))[0] == 200
            shared = a.vsensor.shared.registry
            before = dict(shared.writes)
            for _ in range(10):
                beat = json.dumps({"interfaces": {}}).encode()
                assert (await a.post(PATH_HEARTBEAT, beat, sensor="beater"))[0] == 200
                await asyncio.sleep(1.0)
            refreshes = shared.writes["refresh"] - before["refresh"]
            print(f"heartbeats 10, record writes {shared.writes} (before: {before})")
            assert 4 <= refreshes <= 7, shared.writes
            # ... and the other replica never saw it older than the name_in_use window.

    asyncio.run(scenario())


def test_two_replica_processes_share_the_registry_and_replay_protection(tmp_path, nats):
    """``ossensor-vsensor --nats`` as two real processes (the CLI's path, one certificate):
    a replay to the other process is refused, its status shows the first one's sensor, and a
    sensor whose replica was SIGKILLed registers with the other one."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ports, processes = [free_port(), free_port()], []
    for name, port in zip(("proc-a", "proc-b"), ports):
        (tmp_path / name).mkdir()
        processes.append(start_local(
            tmp_path / name, port, "vsensor.log", "--nats", nats.urls, "--replica", name,
            "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
            "--claims-allow", DOCUMENTATION_RANGES, env={"VSENSOR_HMAC_KEY": KEY}))

    async def scenario():
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_ctx)) as session:
            async def post(port: int, body: bytes, signed: dict[str, str]):
                async with session.post(f"https://127.0.0.1:{port}{PATH_REGISTER}",
                                        data=body, headers={"X-Ossensor-Protocol": "1",
                                                            "X-Ossensor-Instance": "p" * 16,
                                                            **signed}) as r:
                    return r.status, await r.json()

            body = json.dumps({"sensor": "procs", "versions": [1], "instance": "p" * 16,
                               "addresses": ["192.0.2.81"]}).encode()
            captured = sign(KEY, "POST", PATH_REGISTER, body, "procs")
            assert (await post(ports[0], body, captured))[0] == 200
            status, answer = await post(ports[1], body, captured)
            assert (status, answer["error"]) == (401, "replay")
            deadline = time.monotonic() + 10
            while True:
                async with session.get(f"https://127.0.0.1:{ports[1]}/status.json") as r:
                    page = await r.json()
                shown = {s["name"]: s.get("replica") for s in page["sensors"]}
                if shown.get("procs") == "proc-a":
                    break
                assert time.monotonic() < deadline, page
                await asyncio.sleep(0.1)
            processes[0].send_signal(signal.SIGKILL)
            processes[0].wait(timeout=10)
            status, _ = await post(ports[1], body, sign(KEY, "POST", PATH_REGISTER, body,
                                                        "procs"))
            assert status == 200  # the same instance, moved: not name_in_use

    try:
        asyncio.run(scenario())
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                assert process.wait(timeout=30) == 0
    log = (tmp_path / "proc-b" / "vsensor.log").read_text()
    assert KEY not in log and "Traceback" not in log, log[-3000:]


# -- the parse functions, fed anything ---------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=20)
_record_fields = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 2, "1", None]), "name": st.sampled_from(["fz", "other", 3]),
    "replica": st.sampled_from(["r", "", 5]), "addresses": st.lists(
        st.sampled_from(["192.0.2.1", "::1", "fe80::1%eth0", "300.1.1.1", ""]), max_size=3),
    "workloads": st.lists(st.sampled_from(["198.51.100.0/28", "0.0.0.0/0", "x"]),
                          max_size=3),
    "last_seen": _json, "registered": _json, "packets": _json, "version": _json,
    "features": _json, "instance": _json})


@hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                 _record_fields.map(lambda v: json.dumps(v).encode())),
       st.sampled_from([names.token("fz"), "fz", "s", "ag-1", "replica-a"]))
def test_parse_functions_take_anything_and_answer_valueerror_or_a_bounded_value(value, key):
    now = time.time()
    for parse in (lambda: parse_record(key, value, CLAIMS),
                  lambda: parse_action(key, value, now), lambda: parse_replica(key, value)):
        try:
            parsed = parse()
        except ValueError as exc:
            assert len(str(exc)) < 600
            continue
        if isinstance(parsed, SensorState):  # a sensor record within every bound
            assert parsed.name == "fz" and parsed.replica
            assert len(parsed.addresses) <= 1024


def test_nonce_keys_are_valid_bucket_keys():
    assert nonce_key("a" * 32) != nonce_key("a" * 33)
    assert len(nonce_key("x" * 128)) == 64
