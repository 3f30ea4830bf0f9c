"""What a diagnose check is, and what the checks found so far and later ones build on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ossensor_core.node.interfaces import Decision, Interface, Primary
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.loading import LoadedPlugins
from ossensor_core.wire.names import LINKTYPE_ETHERNET

Status = Literal["ok", "warning", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    """One line of the report: ``figure`` is what was measured, ``action`` what to do."""

    id: str
    status: Status
    figure: str
    action: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "figure": self.figure,
                "action": self.action, "data": dict(self.data)}


def ok(check_id: str, figure: str, **data: Any) -> Check:
    return Check(check_id, "ok", figure, data=data)


def skip(check_id: str, why: str) -> Check:
    return Check(check_id, "skip", why)


@dataclass
class Context:
    """What the checks found so far and later checks build on."""

    config: SensorConfig | None = None
    plugins: LoadedPlugins | None = None
    interfaces: list[Interface] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    primary: Primary = Primary(None, "not determined")
    kernel_filter: str | None = None
    #: Variables whose value is invalid (their checks failed).
    bad_variables: set[str] = field(default_factory=set)

    @property
    def selected(self) -> list[Interface]:
        return [d.interface for d in self.decisions if d.selected]

    def linktypes(self) -> list[int]:
        """The link types the filter must compile for (Ethernet when nothing is selected)."""
        return sorted({i.linktype for i in self.selected if i.linktype is not None}) \
            or [LINKTYPE_ETHERNET]
