"""``make soak`` in two minutes: after pods came and went, the vSensor restarted (and was
killed) and Antigena actions came and expired, the sensor is back at the descriptors and threads
it started with, and every datagram sent was stored exactly once.

Slopes mean nothing over two minutes (the warm-up alone is longer); ``make soak`` measures
them (``docs/soak.md``).
"""

from __future__ import annotations

import pytest

from bench.soak import Plan, run_soak
from tests.helpers.netns import needs_netns

#: About 2.2 minutes in all: 90 s of churn at 5,000 datagrams/s, start-up and settling.
QUICK = Plan(minutes=1.5, sample=3.0, churn=5.0, restart=30.0, down=3.0, antigena=12.0,
             antigena_duration=5.0)


@needs_netns
@pytest.mark.timeout(240)
def test_two_minute_soak_leaves_descriptors_threads_and_data_intact(tmp_path):
    pytest.importorskip("trustme")
    result = run_soak(QUICK, tmp_path)
    events = result["events"]
    assert events["pods"] >= 8 and events["restarts"] >= 2 and events["kills"] >= 1, events
    assert events["actions"] >= 3, events
    assert result["exit_codes"] == {"sensor": 0, "vsensor": 0}
    assert result["stored_once"] == result["sent"], (
        f"{result['missing']} missing (first {result['first_missing']}), "
        f"{result['stored_twice_or_more']} stored more than once")
    start, end = result["start"]["sensor"], result["end"]["sensor"]
    assert (end["fds"], end["threads"]) == (start["fds"], start["threads"]), result["start_end"]
    # While it ran, descriptors may rise by what the design lets exist at once beside the
    # quiet state's: the HTTPS transport's other connections (its connector holds at most 4,
    # the quiet state 1), a pod veth's ring socket and its netlink watch, Antigena's watch
    # socket and a websocket being replaced, a spool file being written and a resolver socket.
    # A loaded machine reaches +7 (CI beside three soaks); a leak would not end at the start.
    transient = (4 - 1) + 2 + 2 + 1 + 1
    during = [s["sensor"] for s in result["samples"] if s["phase"] == "run"]
    assert max(s["fds"] for s in during) <= start["fds"] + transient, \
        result["ranges_after_warmup"]
    assert max(s["threads"] for s in during) == start["threads"]
