"""The report: one line per check, or JSON; the exit code."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from .checks import Check


def exit_code(checks: Iterable[Check]) -> int:
    """0 only when nothing failed (warnings and skipped checks do not fail)."""
    return 1 if any(c.status == "fail" for c in checks) else 0


def render(checks: Sequence[Check], as_json: bool, secret: str = "") -> str:
    """One line per check (``status id figure -> action``), or JSON; ``secret`` is masked."""
    if as_json:
        counts = {s: sum(1 for c in checks if c.status == s)
                  for s in ("ok", "warning", "fail", "skip")}
        text = json.dumps({"checks": [c.as_json() for c in checks], "summary": counts,
                           "exit_code": exit_code(checks)}, indent=2, default=str)
    else:
        width = max((len(c.id) for c in checks), default=0)
        lines = []
        for c in checks:
            line = f"{c.status:<7} {c.id:<{width}}  {c.figure}"
            if c.action and c.status in ("warning", "fail"):
                line += f" -> {c.action}"
            lines.append(" ".join(line.split("\n")))
        text = "\n".join(lines)
    if secret:  # as given, and as JSON escapes it
        for form in {secret, json.dumps(secret)[1:-1]}:
            text = text.replace(form, "***")
    return text
