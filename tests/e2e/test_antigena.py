"""Antigena end to end: real TCP streams between namespaces, the sensor in the server's namespace
(as a hostNetwork sensor), the reference vSensor beside it, actions issued with its CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.core.test_plugin_loading import make_distribution
from tests.helpers.cli import TEST_KEY, ossensor
from tests.helpers.metrics import METRICS, scrape
from tests.helpers.netns import Namespace, veth_pair
from tests.helpers.sensor import Sensor, sensor_env
from tests.helpers.traffic import Tcpdump

VSENSOR_CLI = [sys.executable, "-m", "ossensor_vsensor.cli"]
TOKEN = "e2e-operator-token"
PORT = 8443
CLIENT, SERVER = "192.0.2.1", "192.0.2.2"

# Roles: ``server PORT`` accepts connections and reads; ``client PORT SECONDS`` streams (0: sends
# nothing and waits, an idle connection). Each
# prints JSON lines: what happened, with the wall-clock time (both run on this machine).
STREAM = r"""
import errno, json, socket, sys, threading, time
lock = threading.Lock()
def emit(**fields):
    with lock:  # one write per line: the server's threads emit too
        sys.stdout.write(json.dumps(dict(fields, t=time.time())) + "\n")
        sys.stdout.flush()
def failure(exc):
    return errno.errorcode.get(exc.errno, str(exc)) if exc.errno else type(exc).__name__
role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port)); listener.listen(16); emit(event="ready")
    def serve(conn, peer):
        try:
            while conn.recv(65536):
                pass
            emit(event="eof", peer=peer[1])
        except OSError as exc:
            emit(event="error", peer=peer[1], errno=failure(exc))
    while True:
        conn, peer = listener.accept()
        emit(event="accepted", peer=peer[1])
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
else:
    seconds = float(sys.argv[4])
    try:
        s = socket.create_connection((host, port), timeout=3)
        emit(event="connected", port=s.getsockname()[1])
        if not seconds:
            s.settimeout(None)
            s.recv(1)
            emit(event="eof")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            s.sendall(b"x" * 1000)
            time.sleep(0.005)
        s.close()
        emit(event="done")
    except OSError as exc:
        emit(event="error", errno=failure(exc))
"""


class Stream:
    """One role of STREAM in a namespace; a thread collects its JSON lines as they come."""

    def __init__(self, ns: Namespace, *args: str) -> None:
        self.proc = ns.popen(sys.executable, "-u", "-c", STREAM, *args, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait(self, event: str, timeout: float = 10.0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for seen in list(self.events):
                if seen["event"] == event and all(seen.get(k) == v for k, v in match.items()):
                    return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} {match} in {self.events}")
            time.sleep(0.02)

    def result(self, timeout: float = 10.0) -> dict:
        """The client's last word: ``done`` or ``error``."""
        deadline = time.monotonic() + timeout
        while True:
            final = [e for e in list(self.events) if e["event"] in ("done", "error")]
            if final:
                return final[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"the client did not finish: {self.events}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


class VSensor:
    """The reference vSensor in a namespace with an admin token; the operator's CLI beside it."""

    def __init__(self, ns: Namespace, data: Path, host: str = "127.0.0.1") -> None:
        self.ns, self.data, self.host = ns, data, host
        self.log = data.parent / "vsensor.log"
        self.url = f"https://{host}:{PORT}"
        self.ca_file = data / ".tls" / "vsensor-cert.pem"  # self-signed: its own trust anchor
        self.start()

    def start(self) -> None:
        """Start (again: the certificate and the actions in force are kept, the reports
        are not)."""
        env = {"PATH": os.environ["PATH"], "VSENSOR_HMAC_KEY": TEST_KEY,
               "VSENSOR_ADMIN_TOKEN": TOKEN}
        before = len(self.log.read_text()) if self.log.exists() else 0
        with open(self.log, "a") as log:
            self.proc = self.ns.popen(*VSENSOR_CLI, "--listen", f"{self.host}:{PORT}",
                                      "--data-dir", str(self.data), "--heartbeat-seconds", "1",
                                      env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while "listening on" not in self.log.read_text()[before:]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def antigena(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ["PATH"], "VSENSOR_ADMIN_TOKEN": TOKEN}
        done = self.ns.exec(*VSENSOR_CLI, "antigena", "--url", self.url, "--ca-file",
                            str(self.ca_file), *args, check=False, env=env)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def block(self, *args: str) -> dict:
        """Issue a block; return the action as the vSensor lists it."""
        action_id = self.antigena("block", *args).stdout.strip()
        listed = json.loads(self.antigena("list", "--json").stdout)
        return next(a for a in listed if a["id"] == action_id)

    def status(self) -> dict:
        script = ("import json, ssl, sys, urllib.request\n"
                  "r = urllib.request.Request(sys.argv[1] + '/status.json', headers={"
                  "'Authorization': 'Bearer ' + sys.argv[2]})\n"
                  "ctx = ssl.create_default_context(cafile=sys.argv[3])\n"
                  "print(urllib.request.urlopen(r, context=ctx, timeout=10).read().decode())")
        done = self.ns.exec(sys.executable, "-c", script, self.url, TOKEN, str(self.ca_file))
        return json.loads(done.stdout)["antigena"]

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=15)


def start_sensor(ns: Namespace, base_env: dict[str, str], tmp_path: Path, vsensor: VSensor,
                 **extra: str) -> Sensor:
    env = sensor_env(base_env, tmp_path, OSSENSOR_TRANSPORT="https",
                     VSENSOR_HOSTNAME=vsensor.host, VSENSOR_PORT=str(PORT),
                     VSENSOR_CA_FILE=str(vsensor.ca_file), OSSENSOR_DEBUG="3",
                     OSSENSOR_SPOOL_DIR=str(tmp_path / "spool"))
    env.update(ANTIGENA_ENABLED="true", ANTIGENA_TIME_PERIOD="2")
    env.update(extra)
    sensor = Sensor(ns, env, tmp_path)
    sensor.wait_for_log("capturing on rx0")
    return sensor


@pytest.fixture
def lab(netns_pair, base_env, tmp_path):
    """(client ns, server ns, vSensor): a veth between them, the vSensor in the server's."""
    tx, rx = netns_pair
    with veth_pair(tx, rx, tx_addr=f"{CLIENT}/24", rx_addr=f"{SERVER}/24"):
        vsensor = VSensor(rx, tmp_path / "vsensor")
        try:
            yield tx, rx, vsensor
        finally:
            assert vsensor.stop() == 0
            assert TEST_KEY not in vsensor.log.read_text()


def probe(tx: Namespace, port: int, seconds: float = 1.0) -> dict:
    """A fresh connection that streams for ``seconds``: ``done`` or the error it met."""
    client = Stream(tx, "client", SERVER, str(port), str(seconds))
    try:
        return client.result(timeout=seconds + 10)
    finally:
        client.stop()


def test_block_resets_both_ends_reports_and_ends(lab, base_env, tmp_path):
    tx, rx, vsensor = lab
    site = tmp_path / "site"
    make_distribution(site, "ossensor-record", {"ossensor.plugins": {
        "record": "tests.fixtures.plugins.enforcer_record"}})
    record = tmp_path / "record.txt"
    sensor = start_sensor(rx, base_env, tmp_path, vsensor, OSSENSOR_PLUGINS="record",
                          OSSENSOR_METRICS_ADDRESS=METRICS,
                          OSSENSOR_RECORD_PATH=str(record), PYTHONPATH=os.pathsep.join(
                              [str(site), str(Path(__file__).resolve().parents[2])]))
    servers = [Stream(rx, "server", SERVER, str(port)) for port in (7100, 7200)]
    clients: list[Stream] = []
    try:
        sensor.wait_for_log("Antigena: connected to the vSensor")
        sensor.wait_for_log("Antigena: enforcers reset, record")
        for server in servers:
            server.wait("ready")
        clients = [Stream(tx, "client", SERVER, str(port), "18") for port in (7100, 7200)]
        clients.append(Stream(tx, "client", SERVER, "7100", "0"))  # idle: never sends
        for client in clients:
            client.wait("connected")
        blocked_port = clients[0].events[0]["port"]
        idle_port = clients[2].events[0]["port"]
        time.sleep(0.5)

        action = vsensor.block("--src", CLIENT, "--dst", SERVER, "--dport", "7100",
                               "--duration", "60", "--sensor", "test-node")
        client_error = clients[0].result(timeout=5)
        server_error = servers[0].wait("error", timeout=5, peer=blocked_port)
        assert client_error["event"] == "error" and client_error["errno"] == "ECONNRESET", \
            client_error
        assert server_error["errno"] == "ECONNRESET", server_error
        assert client_error["t"] - action["start"] < 1.0
        assert server_error["t"] - action["start"] < 1.0
        # The idle connection is made to show its sequence numbers, and reset too.
        idle_error = clients[2].result(timeout=5)
        idle_server_error = servers[0].wait("error", timeout=5, peer=idle_port)
        assert idle_error.get("errno") == "ECONNRESET", idle_error
        assert idle_server_error["errno"] == "ECONNRESET"
        assert max(idle_error["t"], idle_server_error["t"]) - action["start"] < 1.0
        # The stream that no action matches keeps running.
        assert clients[1].proc.poll() is None
        assert not [e for e in clients[1].events if e["event"] == "error"]

        # The report reaches the vSensor within ANTIGENA_TIME_PERIOD (2 s) + 1 s of the hits.
        first = wait_for_counts(vsensor, action["id"], connections=2,
                                timeout=max(client_error["t"] + 2 + 1 - time.time(), 0.1))
        assert first["resets"] >= 2 and first["first_hit"] >= action["start"] - 1

        # New matching connections are reset while the action holds.
        assert probe(tx, 7100)["event"] == "error"
        counts = wait_for_counts(vsensor, action["id"], connections=3, timeout=2 + 1)
        assert vsensor.status()["sensors"]["test-node"]["connected"] is True
        assert counts["resets"] >= 6 and counts["segments"] >= 3
        assert counts["first_hit"] >= action["start"] - 1
        assert counts["enforcers"]["reset"] >= 2
        assert counts["enforcers"]["record"] == counts["segments"]
        assert f"{action['id']} rx0 1" in record.read_text()
        # The metrics count since the start what the reports count per period.
        samples = scrape(rx)
        assert samples["ossensor_antigena_actions"] == 1
        assert samples["ossensor_antigena_actions_received_total"] == 1
        assert samples["ossensor_antigena_resets_total"] >= counts["resets"]
        assert samples["ossensor_antigena_probes_total"] >= 1
        assert samples["ossensor_antigena_resets_rate_limited_total"] == 0

        # Cleared: new connections work again.
        assert vsensor.antigena("clear", action["id"]).stdout.strip() == \
            f"cleared {action['id']}"
        time.sleep(0.3)
        assert probe(tx, 7100)["event"] == "done"

        # A short action expires on its own.
        vsensor.antigena("block", "--dst", SERVER, "--dport", "7100", "--duration", "4")
        issued = time.monotonic()  # the action expires at the latest 4 s from here
        assert probe(tx, 7100, 0.5)["event"] == "error"
        time.sleep(max(issued + 4.5 - time.monotonic(), 0))
        assert probe(tx, 7100)["event"] == "done"

        assert clients[1].result(timeout=30)["event"] == "done"  # ran its 18 s untouched
        code, _ = sensor.terminate(timeout=10)
        assert code == 0, sensor.proc.stderr.read()
    finally:
        for stream in clients + servers:
            stream.stop()
    log = sensor.log.read_text()
    assert "Antigena: reset 192.0.2.1:" in log or "Antigena: reset 192.0.2.2:" in log
    assert "Antigena: probed idle connection 192.0.2.2:7100 <-> 192.0.2.1:" in log
    assert re.search(r"Antigena: \d+ actions in force; since the last report", log)
    assert TEST_KEY not in log


def test_disabled_antigena_opens_no_websocket_and_injects_nothing(lab, base_env, tmp_path):
    tx, rx, vsensor = lab
    sensor = start_sensor(rx, base_env, tmp_path, vsensor, ANTIGENA_ENABLED="false")
    server = Stream(rx, "server", SERVER, "7100")
    client = None
    try:
        sensor.wait_for_log("kernel filter is now", timeout=15)  # registered with the vSensor
        server.wait("ready")
        with Tcpdump(tx, "tx0", tmp_path / "resets.pcap", "tcp[tcpflags] & tcp-rst != 0") \
                as tcpdump:
            client = Stream(tx, "client", SERVER, "7100", "3")
            client.wait("connected")
            vsensor.block("--dst", SERVER, "--dport", "7100", "--duration", "30",
                          "--sensor", "test-node")
            assert client.result(timeout=10)["event"] == "done"
            time.sleep(1.2)
            assert tcpdump.stop()["captured"] == 0
        state = vsensor.status()
        assert state["sensors"].get("test-node", {}).get("connections", 0) == 0
        code, _ = sensor.terminate(timeout=10)
        assert code == 0
    finally:
        server.stop()
        if client is not None:
            client.stop()
    log = sensor.log.read_text()
    assert "Antigena" not in log


def wait_for_counts(vsensor: VSensor, action_id: str, timeout: float = 5.0,
                    **expected: int) -> dict:
    """The reported totals of ``action_id`` once they reach ``expected`` (never above it)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = vsensor.status()["sensors"].get("test-node", {}).get("actions", {}).get(
            action_id, {})
        if all(counts.get(k, 0) >= v for k, v in expected.items()):
            assert all(counts[k] == v for k, v in expected.items()), counts
            return counts
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)


def test_reconnects_gets_actions_in_force_and_delivers_kept_reports(lab, base_env, tmp_path):
    tx, rx, vsensor = lab
    server = Stream(rx, "server", SERVER, "7300")
    sensor = None
    try:
        server.wait("ready")
        # Issued before the sensor starts: its first websocket brings it (the same as after a
        # reconnect).
        action = vsensor.block("--dst", SERVER, "--dport", "7300", "--duration", "60")
        sensor = start_sensor(rx, base_env, tmp_path, vsensor,
                              OSSENSOR_ANTIGENA_RECONNECT_MAX_SECONDS="1")
        sensor.wait_for_log("1 actions in force after sync")
        assert probe(tx, 7300, 0.5)["event"] == "error"

        # The websocket drops (the kernel destroys the sensor's sockets to the vSensor): it
        # comes back and the action is still in force.
        kill = rx.exec("ss", "-K", "dst", "127.0.0.1", "dport", "=", str(PORT), check=False)
        assert kill.returncode == 0, kill.stderr
        sensor.wait_for_log(r"(1 actions in force after sync(.|\n)*){2}", timeout=10)
        assert probe(tx, 7300, 0.5)["event"] == "error"
        wait_for_counts(vsensor, action["id"], connections=2)  # both probes reported

        # The vSensor goes away: the action is still enforced, the report is kept, and it
        # reaches the restarted vSensor, which read its actions in force back from its data
        # directory: the sensor keeps enforcing the action until the operator clears it.
        assert vsensor.stop() == 0
        assert probe(tx, 7300, 0.5)["event"] == "error"
        sensor.wait_for_log("vSensor away, 1 reports kept", timeout=5)
        vsensor.start()
        sensor.wait_for_log(r"(1 actions in force after sync(.|\n)*){3}", timeout=10)
        # The restarted vSensor's counts start from the kept report: the probe made while it
        # was away.
        wait_for_counts(vsensor, action["id"], connections=1)
        assert probe(tx, 7300, 0.5)["event"] == "error"
        vsensor.antigena("clear", action["id"])
        sensor.wait_for_log(f"action {action['id']} cleared", timeout=10)
        assert probe(tx, 7300, 0.5)["event"] == "done"
        code, _ = sensor.terminate(timeout=10)
        assert code == 0
    finally:
        server.stop()


def test_traffic_to_the_vsensor_is_never_blocked(netns_pair, base_env, tmp_path):
    """The vSensor across the veth (in the client's namespace): a block of everything to its
    host resets other connections there, never the sensor's own."""
    tx, rx = netns_pair
    with veth_pair(tx, rx, tx_addr=f"{CLIENT}/24", rx_addr=f"{SERVER}/24"):
        vsensor = VSensor(tx, tmp_path / "vsensor", host=CLIENT)
        server = Stream(tx, "server", CLIENT, "7400")
        sensor = None
        try:
            sensor = start_sensor(rx, base_env, tmp_path, vsensor)
            sensor.wait_for_log("Antigena: connected to the vSensor")
            server.wait("ready")
            # Issue 16: a block of everything to the vSensor's host would cut the sensor's own
            # connection: refused with the reason. The sensor still keeps its own traffic out
            # of the watch (the filter below) for whatever it is sent.
            refused = vsensor.antigena("block", "--dst", CLIENT, "--duration", "30",
                                       check=False)
            assert refused.returncode == 1
            assert f"would cut the sensors' connections to this vSensor at {CLIENT} port " \
                f"{PORT}" in refused.stderr
            action = vsensor.block("--dst", CLIENT, "--dport", "7400", "--duration", "30")
            client = Stream(rx, "client", CLIENT, "7400", "1")  # from the sensor's host
            try:
                assert client.result(timeout=10)["event"] == "error"
            finally:
                client.stop()
            counts = wait_for_counts(vsensor, action["id"], connections=1, timeout=4)
            assert counts["resets"] >= 2
            time.sleep(1)  # a heartbeat and another report go through too
            state = vsensor.status()["sensors"]["test-node"]
            assert state["connected"] is True and state["connections"] == 1
            assert "closed the websocket" not in sensor.log.read_text()
            code, _ = sensor.terminate(timeout=10)
            assert code == 0
        finally:
            server.stop()
            if sensor is not None:
                sensor.kill()
            assert vsensor.stop() == 0
    assert f"not (host {CLIENT} and tcp port {PORT})" in sensor.log.read_text()


# The sensor's handling of what a (newer or broken) vSensor might send, run in a namespace.
MESSAGES = r"""
import asyncio, json, time
from ossensor_plugins.antigena.service import Antigena
from ossensor_plugins.antigena.resets import ResetEnforcer

async def main():
    service = Antigena(host="127.0.0.1", port=9, key="k", sensor="s", tls=False, period=5,
                       enforcers=[ResetEnforcer(10)])
    later = time.time() + 60
    good = {"id": "ag-1", "kind": "block", "dst": "192.0.2.2/32", "dport": 7100,
            "start": time.time(), "expiry": later}
    for text in ["not json", json.dumps({"type": "frobnicate", "id": "x"}),
                 json.dumps({"type": "action", "action": dict(good, id="ag-2", dport=70000)}),
                 json.dumps({"type": "action", "action": dict(good, id="ag-3", dst="300.0.0.1")}),
                 json.dumps({"type": "action", "action": dict(good, id="ag-4", kind="nuke")}),
                 json.dumps({"type": "action", "action": dict(good, id="ag-5", expiry=1.0)}),
                 json.dumps({"type": "action", "action": good}),
                 json.dumps({"type": "action", "action": good}),
                 json.dumps({"type": "clear", "id": "ag-unknown"})]:
        await service._on_message(text)
    report = service.take_report()
    print(json.dumps({"actions": sorted(service.actions), "rejected": report["rejected"],
                      "filter": service.watch.expression}))
    service.watch.close()

asyncio.run(main())
"""


def test_malformed_unknown_and_duplicate_actions(netns):
    done = netns.exec(sys.executable, "-c", MESSAGES)
    result = json.loads(done.stdout)
    assert result["actions"] == ["ag-1"]  # the duplicate is one action
    reasons = {r["id"]: r["reason"] for r in result["rejected"]}
    assert reasons[None] == "a message from the vSensor is not JSON"
    assert reasons["x"] == "unknown message type 'frobnicate'"
    assert reasons["ag-2"] == "dport 70000 is not a port (1-65535)"
    assert reasons["ag-3"] == "dst '300.0.0.1' is not an address or CIDR"
    assert "unknown kind of action 'nuke'" in reasons["ag-4"]
    assert reasons["ag-5"] == "the action has already expired"
    # Issue 16: the filter reads the whole TCP header before it matches (a truncated frame
    # never does).
    assert result["filter"] == ("tcp and ((ip and tcp[19] >= 0) or (ip6 and ip6[59] >= 0)) "
                                "and (((dst net 192.0.2.2/32 and dst port 7100) or "
                                "(src net 192.0.2.2/32 and src port 7100)))")


def test_loaded_by_default_unless_disabled(netns, base_env):
    netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    for env, loaded in (({}, True), ({"ANTIGENA_ENABLED": "false"}, False),
                        ({"OSSENSOR_DISABLE_PLUGINS": "antigena"}, False)):
        result = ossensor(["check"], dict(base_env, **env), netns)
        assert result.code == 0, result.stderr
        report = result.json()
        assert ({"stage": "antigena", "name": "antigena"} in report["loaded"]) is loaded, env
        assert ("OSSENSOR_ANTIGENA_RESETS_PER_SECOND" in report["settings"]) is loaded
    listing = json.loads(ossensor(["plugins"], base_env).stdout)
    assert [p["name"] for p in listing["antigena"]] == ["antigena"]


@pytest.fixture
def bridge_lab(base_env, tmp_path):
    """(client ns, server ns, sensor ns, vSensor): the three on ports of a bridge in a fourth
    namespace that floods every frame (ageing time 0, a hub), so the sensor only sees the
    traffic between the two others; the vSensor runs in the sensor's namespace."""
    from tests.helpers.netns import have_netns, namespaces, run, unique

    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(4) as (client, server, watcher, switch):
        switch.ip("link", "add", "br0", "type", "bridge", "ageing_time", "0")
        for ns, name, address in ((client, "tx0", f"{CLIENT}/24"),
                                  (server, "tx0", f"{SERVER}/24"), (watcher, "rx0", None)):
            inside, port = unique("vi"), unique("vp")
            run(["ip", "link", "add", inside, "netns", ns.name, "type", "veth", "peer", "name",
                 port, "netns", switch.name])
            ns.ip("link", "set", inside, "name", name)
            if address:
                ns.ip("addr", "add", address, "dev", name)
            ns.ip("link", "set", name, "up")
            switch.ip("link", "set", port, "master", "br0")
            switch.ip("link", "set", port, "up")
        switch.ip("link", "set", "br0", "up")
        vsensor = VSensor(watcher, tmp_path / "vsensor")
        try:
            yield client, server, watcher, vsensor
        finally:
            assert vsensor.stop() == 0


def test_sensor_on_a_bridge_port_resets_both_remote_ends(bridge_lab, base_env, tmp_path):
    client_ns, server_ns, watcher, vsensor = bridge_lab
    sensor = start_sensor(watcher, base_env, tmp_path, vsensor)
    servers = [Stream(server_ns, "server", SERVER, str(port)) for port in (7100, 7200)]
    clients: list[Stream] = []
    try:
        sensor.wait_for_log("Antigena: connected to the vSensor")
        for server in servers:
            server.wait("ready")
        clients = [Stream(client_ns, "client", SERVER, str(port), "6") for port in (7100, 7200)]
        for client in clients:
            client.wait("connected")
        blocked_port = clients[0].events[0]["port"]
        time.sleep(0.3)
        action = vsensor.block("--src", CLIENT, "--dst", SERVER, "--dport", "7100",
                               "--duration", "30")
        client_error = clients[0].result(timeout=5)
        server_error = servers[0].wait("error", timeout=5, peer=blocked_port)
        assert client_error.get("errno") == "ECONNRESET", client_error
        assert server_error["errno"] == "ECONNRESET", server_error
        assert max(client_error["t"], server_error["t"]) - action["start"] < 1.0
        assert clients[1].result(timeout=15)["event"] == "done"
        code, _ = sensor.terminate(timeout=10)
        assert code == 0
    finally:
        for stream in clients + servers:
            stream.stop()
    log = sensor.log.read_text()
    assert "seen on rx0" in log and TEST_KEY not in log
