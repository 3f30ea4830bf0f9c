"""``BlockAction.from_json`` reads what arrives over the vSensor's websocket (on the sensor) and
the vSensor's own file of actions in force: fed garbage, it answers ValueError or an action
within every bound, nothing else."""

from __future__ import annotations

import math
import time

from hypothesis import HealthCheck, given, settings, strategies as st

from ossensor_core.wire.antigena import MAX_DURATION_SECONDS, BlockAction

NOW = time.time()
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def garbled(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` four times in five, otherwise any JSON scalar."""
    return st.integers(0, 4).flatmap(lambda k: valid if k else _scalars)


_fields = {
    "id": st.one_of(st.text(min_size=1, max_size=120), _scalars),
    "kind": garbled(st.just("block")),
    "protocol": garbled(st.just("tcp")),
    "src": garbled(st.sampled_from(["192.0.2.1", "10.0.0.0/8", "fe80::1%eth0", "2001:db8::/32",
                                    "10.0.0.1/8", "::/0"])),
    "dst": st.one_of(st.sampled_from(["198.51.100.7", "2001:db8::7", "0.0.0.0/0"]), _scalars),
    "sport": garbled(st.integers(min_value=-5, max_value=70000)),
    "dport": garbled(st.integers(min_value=-5, max_value=70000)),
    "start": garbled(st.floats(min_value=NOW - 10**4, max_value=NOW + 10**7)),
    "sensor": garbled(st.text(max_size=80)),
}
#: Near-valid messages (an id, a destination, an expiry within 70 days) with any field garbled,
#: so that both answers, an action and a ValueError, are reached.
_required = {
    "id": garbled(st.text(min_size=1, max_size=120)),
    "dst": garbled(st.sampled_from(["198.51.100.7", "2001:db8::7", "0.0.0.0/0", "10.0.0.1/8"])),
    "expiry": garbled(st.floats(min_value=NOW - 10**3, max_value=NOW + 6 * 10**6)),
}
_fields.pop("id"), _fields.pop("dst")
_messages = st.one_of(_json, st.fixed_dictionaries(_required, optional=_fields))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=_messages, targeted=st.booleans())
def test_garbage_gives_value_error_or_a_bounded_action(message, targeted):
    try:
        action = BlockAction.from_json(message, NOW, targeted=targeted)
    except ValueError as exc:
        assert str(exc) and len(str(exc)) < 400  # one line naming the field, bounded
        return
    assert isinstance(action.id, str) and 0 < len(action.id) <= 100
    assert action.src is not None or action.dst is not None
    for port in (action.sport, action.dport):
        assert port is None or (type(port) is int and 1 <= port <= 65535)
    assert math.isfinite(action.start) and math.isfinite(action.expiry)
    assert NOW < action.expiry <= NOW + 2 * MAX_DURATION_SECONDS
    assert action.start < action.expiry
    assert action.sensor is None or targeted
