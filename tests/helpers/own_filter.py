"""What the https transport applies to a sensor, split into its two parts.

From its start the transport leaves out its own traffic to the configured vSensor
(``VSensorFilter.set_own``: ``not (host A and tcp port P)``, alone), then ANDs that part with
every filter the vSensor sends. Test doubles of ``SensorControl`` record every call and show the
vSensor's part with :func:`vsensor_parts`, after checking that the own part came first, alone,
and stays in front of every later filter.
"""

from __future__ import annotations

import re

OWN = re.compile(r"not \(host [0-9a-fA-F.:]+ and tcp port \d+\)( and not \(host [0-9a-fA-F.:]+ "
                 r"and tcp port \d+\))*")


def vsensor_parts(expressions: list[str]) -> list[str]:
    """The vSensor's part of each expression applied after the first (the own part alone)."""
    if not expressions:
        return []
    own = expressions[0]
    assert OWN.fullmatch(own), f"the first filter applied is not the own exclusion: {own!r}"
    parts = []
    for expression in expressions[1:]:
        assert expression == own or expression.startswith(own + " and "), \
            f"{expression!r} lost the own exclusion {own!r}"
        parts.append(expression[len(own) + len(" and "):] if expression != own else "")
    return parts
