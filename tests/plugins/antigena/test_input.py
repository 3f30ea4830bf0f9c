"""Antigena input on the sensor (issue 16, item 1): the antigena service with its real watch
socket, in a namespace of its own, fed what a broken or hostile vSensor could send. Nothing is
reported in force that the watch filter in place does not match."""

from __future__ import annotations

import json
import sys

# Runs inside the namespace: prints one JSON object with what the service did.
SCRIPT = r"""
import asyncio, json, sys, time
import ossensor_plugins
from ossensor_plugins.antigena import service as service_module
from ossensor_plugins.antigena.service import Antigena

async def main():
    service = Antigena(host="127.0.0.1", port=9, key="k", sensor="s", tls=False, period=5,
                       enforcers=[])
    now = time.time()
    good = {"id": "ag-1", "kind": "block", "dst": "192.0.2.2/32", "dport": 7100,
            "start": now, "expiry": now + 60}
    await service._on_message(json.dumps({"type": "sync", "server_time": now, "actions": [],
                                          "vsensor": [{"host": "198.51.100.9", "port": 9443},
                                                      {"host": "fe80::1%eth0", "port": 1},
                                                      {"host": "x", "port": True}]}))
    bad = {"ag-nan": {"expiry": float("nan")}, "ag-inf": {"expiry": float("inf")},
           "ag-big": {"expiry": 1e308}, "ag-neg": {"start": -5.0},
           "ag-backwards": {"start": now + 50, "expiry": now + 40},
           "ag-far": {"start": now + 400 * 86400, "expiry": now + 401 * 86400},
           "ag-long": {"expiry": now + 90 * 86400},
           "ag-scope": {"dst": "fe80::1%eth0"}, "ag-hostbits": {"dst": "192.0.2.2/24"},
           "ag-cut": {"dst": "198.51.100.0/24", "dport": None},
           "ag-cut-port": {"dst": None, "src": "198.51.100.9", "sport": 9443, "dport": None}}
    for action_id, change in bad.items():
        await service._on_message(json.dumps({"type": "action",
                                              "action": dict(good, id=action_id, **change)}))
    await service._on_message(json.dumps({"type": "action", "action": good}))
    # An action that starts later: held, not watched, reported as scheduled.
    later = dict(good, id="ag-later", dport=7200, start=time.time() + 1.5)
    await service._on_message(json.dumps({"type": "action", "action": later}))
    first = service.take_report()
    first_filter = service.watch.expression
    expiry = asyncio.create_task(service._expire_forever())
    await asyncio.sleep(2.0)
    second = service.take_report()
    second_filter = service.watch.expression
    # The cap: beyond it, actions are rejected, never held unenforced.
    for n in range(45):
        await service._on_message(json.dumps({"type": "action", "action": dict(
            good, id=f"ag-cap-{n}", dst=f"203.0.113.{n}/32")}))
    capped = service.take_report()
    # A set the kernel cannot take (the cap raised far beyond what fits): the actions new to it
    # are rejected with the reason, the ones in force stay in force. The compilation runs in
    # a thread: the event loop keeps ticking.
    service_module.MAX_ACTIONS_IN_FORCE = 1000
    big = [dict(good, id=f"ag-big-{n}", src=f"2001:db8:{n:x}::/127", sport=1024 + n,
                dst=f"2001:db9:{n:x}::/127", dport=2048 + n) for n in range(150)]
    gaps, ticking = [], True
    async def tick():
        last = time.monotonic()
        while ticking:
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
    ticker = asyncio.create_task(tick())
    in_force_before = sorted(service.enforced)
    started = time.monotonic()
    await service._on_message(json.dumps({"type": "sync", "server_time": time.time(),
                                          "actions": [*big, good, later]}))
    took = time.monotonic() - started
    ticking = False
    await ticker
    overflow = service.take_report()
    expiry.cancel()
    service.watch.close()
    print(json.dumps({"first": first, "second": second, "first_filter": first_filter,
                      "second_filter": second_filter, "capped": capped,
                      "overflow": overflow, "in_force_before": in_force_before,
                      "max_gap": max(gaps), "took": took, "exempt": sorted(service.exempt),
                      "module": ossensor_plugins.__file__}))

asyncio.run(main())
"""


def test_bad_times_networks_cuts_the_cap_and_unenforceable_sets(netns):
    done = netns.exec(sys.executable, "-c", SCRIPT)
    result = json.loads(done.stdout)
    print("module under test:", result["module"])
    first = {r["id"]: r["reason"] for r in result["first"]["rejected"]}
    assert first["ag-nan"] == "expiry nan is not a finite Unix time"
    assert first["ag-inf"] == "expiry inf is not a finite Unix time"
    assert "more than 60 days ahead" in first["ag-big"] or "longer than" in first["ag-big"]
    assert first["ag-neg"] == "start -5.0 is not a finite Unix time"
    assert first["ag-backwards"].startswith("expiry ") and "is not after start" in \
        first["ag-backwards"]
    assert "more than 30 days ahead" in first["ag-far"]
    assert "longer than 2592000 s" in first["ag-long"]
    assert "has a scope id" in first["ag-scope"]
    assert "has host bits set (the network is 192.0.2.0/24)" in first["ag-hostbits"]
    assert first["ag-cut"] == ("it would cut this sensor's connection to the vSensor at "
                               "198.51.100.9 port 9443")
    assert "198.51.100.9 port 9443" in first["ag-cut-port"]
    assert ["198.51.100.9", 9443] in result["exempt"]
    assert ["fe80::1", 1] in result["exempt"]  # never a scope id in a filter
    assert len(result["exempt"]) == 2  # "x" with port true is not an endpoint

    # start honoured: held first, watched once it started.
    assert result["first"]["in_force"] == ["ag-1"]
    assert result["first"]["scheduled"] == ["ag-later"]
    assert "7200" not in result["first_filter"] and "7100" in result["first_filter"]
    assert "(ip and tcp[19] >= 0) or (ip6 and ip6[59] >= 0)" in result["first_filter"]
    assert "not (host 198.51.100.9 and tcp port 9443)" in result["first_filter"]
    assert result["second"]["in_force"] == ["ag-1", "ag-later"]
    assert result["second"]["scheduled"] == []
    assert "7200" in result["second_filter"]

    capped = result["capped"]
    assert len(capped["in_force"]) == 40
    reasons = {r["id"]: r["reason"] for r in capped["rejected"]}
    assert sorted(reasons) == sorted(f"ag-cap-{n}" for n in range(38, 45))
    assert all("40 actions are in force already" in r for r in reasons.values())

    overflow = result["overflow"]
    assert set(overflow["in_force"]) == {"ag-1", "ag-later"}  # still watched
    rejected = {r["id"]: r["reason"] for r in overflow["rejected"]}
    assert sorted(rejected) == sorted(f"ag-big-{n}" for n in range(150))
    assert all("cannot be enforced" in r and "4096" in r for r in rejected.values()), rejected
    assert result["took"] > 0.3  # a real compilation ...
    assert result["max_gap"] < 0.25, result  # ... that never held the event loop
