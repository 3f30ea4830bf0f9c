"""Workload ranges are read over netlink only when the routes changed (heartbeats ask often)."""

from __future__ import annotations

import json
import sys

from tests.helpers.netns import needs_netns, veth_pair

SCRIPT = r"""
import json, subprocess, sys
from ossensor_core.node.workloads import WorkloadFinder, find_workload_ranges

calls = []
def counted():
    calls.append(1)
    return find_workload_ranges()

finder = WorkloadFinder(counted)
seen = [finder(), finder(), finder()]
subprocess.run(["ip", "route", "add", "198.51.100.64/28", "dev", "tx0"], check=True)
seen += [finder(), finder()]
subprocess.run(["ip", "route", "del", "198.51.100.64/28", "dev", "tx0"], check=True)
seen.append(finder())
print(json.dumps({"calls": len(calls), "seen": seen}))
"""


@needs_netns
def test_routes_are_read_again_only_after_they_changed(netns_pair):
    tx, rx = netns_pair
    with veth_pair(tx, rx, tx_addr="192.0.2.1/24", rx_addr="192.0.2.2/24"):
        result = json.loads(tx.exec(sys.executable, "-c", SCRIPT).stdout)
    # A veth route without a gateway is a workload range (ossensor_core/node/workloads.py); the
    # veth's own subnet is one too, since tx0 carries no default route.
    assert result["seen"][:3] == [["192.0.2.0/24"]] * 3
    assert result["seen"][3:5] == [["192.0.2.0/24", "198.51.100.64/28"]] * 2
    assert result["seen"][5] == ["192.0.2.0/24"]
    assert result["calls"] == 3, "netlink asked more often than the routes changed"
