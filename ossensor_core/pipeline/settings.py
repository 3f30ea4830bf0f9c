"""Typed settings: how the core and each plugin declare the environment variables they read.

A plugin returns a :class:`SettingsGroup` from its ``ossensor_settings`` hook. Each setting is read
from ``OSSENSOR_<PLUGIN>_<SETTING>`` (upper case, ``-`` as ``_``) unless it names its variable
explicitly with ``env`` (for names that the guide fixes). The parsed values reach the plugin as a
frozen :class:`PluginSettings`, ``config.plugin("afpacket").block_size``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

#: ``refused``: the variable held a bad value; the default stands in while start-up reports it.
Source = Literal["default", "variable", "legacy", "refused"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


#: Plain ASCII numbers only: ``int()`` and ``float()`` also take ``1_000`` and other scripts'
#: digits, which an operator never means.
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
#: Beyond these no setting means anything (a C ``int64``; about 31 years in seconds): a backstop
#: under each setting's own maximum.
LARGEST_INT = (1 << 63) - 1
LARGEST_FLOAT = 1e9
#: Longest string value unless a setting says otherwise (``PATH_MAX``).
DEFAULT_MAX_LENGTH = 4096
#: Characters of a bad value quoted in a message; the rest is cut.
SHOWN = 160
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def shown(text: str) -> str:
    """``text`` quoted for a message, cut to :data:`SHOWN` characters."""
    if len(text) <= SHOWN:
        return repr(text)
    return f"{text[:SHOWN]!r}... ({len(text)} characters)"


def parse_bool(text: str) -> bool:
    """true/false/1/0/yes/no/on/off in any case; anything else is an error."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{shown(text)} is not a boolean (use true/false, 1/0 or yes/no)")


def _parse_int(text: str) -> int:
    stripped = text.strip()
    if not _INT.fullmatch(stripped):
        raise ValueError(f"{shown(text)} is not a whole number")
    value = int(stripped, 10)
    if abs(value) > LARGEST_INT:
        raise ValueError(f"{shown(text)} is out of range")
    return value


def _parse_float(text: str) -> float:
    stripped = text.strip()
    lowered = stripped.lower().lstrip("+-")
    if lowered in ("nan", "inf", "infinity"):
        raise ValueError(f"{shown(text)} is not a finite number")
    if not _FLOAT.fullmatch(stripped):
        raise ValueError(f"{shown(text)} is not a number")
    value = float(stripped)
    if not math.isfinite(value) or abs(value) > LARGEST_FLOAT:
        raise ValueError(f"{shown(text)} is out of range")
    return value


def split_words(text: str) -> tuple[str, ...]:
    """Split a list given as words separated by white space or commas."""
    return tuple(word for word in re.split(r"[\s,]+", text.strip()) if word)


_PARSERS: dict[type, Callable[[str], Any]] = {
    bool: parse_bool,
    int: _parse_int,
    float: _parse_float,
    str: lambda text: text,
}


def _limit(value: float) -> str:
    """A bound as a user writes it: ``33554432``, not ``3.35544e+07``; ``0.5`` stays."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Setting:
    """One setting: its name, type, default and a one-line description.

    ``minimum``/``maximum`` bound numbers (inclusive), ``max_length`` strings, ``choices``
    restricts strings, ``secret`` hides the value everywhere it is shown, ``required`` makes a
    missing or empty value an error. ``check`` is called with the parsed value and raises
    ValueError (a message without the value's name) when it is unusable: a path that is not a
    file, a malformed fingerprint. ``legacy`` lists older variable names that are honoured when
    the main one is unset.
    """

    name: str
    type: type = str
    default: Any = None
    description: str = ""
    env: str | None = None
    legacy: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False
    secret: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.type not in _PARSERS:
            raise TypeError(f"setting {self.name}: unsupported type {self.type!r}")

    def variable(self, plugin: str | None) -> str:
        """The environment variable that carries this setting."""
        if self.env:
            return self.env
        if plugin is None:
            return self.name.upper()
        return f"OSSENSOR_{plugin}_{self.name}".upper().replace("-", "_")

    def parse(self, text: str) -> Any:
        """Parse and check one value; raises ValueError (the caller hides a secret's message).

        Bytes that are not UTF-8 (``os.environ`` keeps them as lone surrogates), control
        characters and over-long values are refused before anything else reads them."""
        if len(text) > self.max_length:
            raise ValueError(f"is {len(text)} characters long, more than the "
                             f"{self.max_length} allowed")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid UTF-8") from None
        if _CONTROL.search(text):
            raise ValueError(f"{shown(text)} holds control characters")
        value = _PARSERS[self.type](text)
        if self.type in (int, float):
            if self.positive and value <= 0:
                raise ValueError(f"{shown(text)} must be greater than 0")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{shown(text)} is below the minimum {_limit(self.minimum)}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{shown(text)} is above the maximum {_limit(self.maximum)}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{shown(text)} is not one of {', '.join(self.choices)}")
        if self.check is not None:
            self.check(value)
        return value


@dataclass(frozen=True)
class SettingsGroup:
    """What a plugin's ``ossensor_settings`` hook returns: its name and its settings."""

    plugin: str
    settings: Sequence[Setting] = ()


@dataclass(frozen=True)
class ResolvedSetting:
    """A setting's value and where it came from, for ``ossensor check`` and ``diagnose``."""

    setting: Setting
    variable: str
    value: Any
    source: Source
    from_variable: str | None = None

    def shown(self) -> Any:
        """The value as it may be displayed: secrets become ``***``."""
        if self.setting.secret and self.value not in (None, ""):
            return "***"
        return self.value


@dataclass(frozen=True)
class PluginSettings(Mapping[str, Any]):
    """A plugin's parsed settings, frozen; read as attributes or as a mapping."""

    plugin: str
    resolved: Mapping[str, ResolvedSetting] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolved", MappingProxyType(dict(self.resolved)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.resolved[name].value
        except KeyError:
            raise AttributeError(f"plugin {self.plugin!r} has no setting {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self.resolved[name].value

    def refused(self, *names: str) -> bool:
        """Whether any of these settings held a bad value (already reported, one line each):
        a plugin's own check of them would only repeat it."""
        return any(self.resolved[name].source == "refused" for name in names
                   if name in self.resolved)

    def __iter__(self) -> Iterator[str]:
        return iter(self.resolved)

    def __len__(self) -> int:
        return len(self.resolved)


def resolve_settings(
    settings: Sequence[Setting],
    environ: Mapping[str, str],
    plugin: str | None,
    problems: list[str],
) -> dict[str, ResolvedSetting]:
    """Read each setting from ``environ``; append one message per invalid value to ``problems``.

    An empty (or blank) variable counts as unset, as in the original's start-up script.
    """
    resolved: dict[str, ResolvedSetting] = {}
    for setting in settings:
        variable = setting.variable(plugin)
        text = environ.get(variable, "")
        source: Source = "variable"
        from_variable: str | None = variable
        if not text.strip():
            for old in setting.legacy:
                if environ.get(old, "").strip():
                    text, source, from_variable = environ[old], "legacy", old
                    break
        if not text.strip():
            if setting.required:
                problems.append(f"{variable} is required but not set")
            resolved[setting.name] = ResolvedSetting(setting, variable, setting.default, "default")
            continue
        try:
            value = setting.parse(text)
        except ValueError as exc:
            reason = "invalid value (not shown: the setting is secret)" if setting.secret else exc
            problems.append(f"{from_variable}: {reason}")
            resolved[setting.name] = ResolvedSetting(setting, variable, setting.default, "refused",
                                                     from_variable)
            continue
        resolved[setting.name] = ResolvedSetting(setting, variable, value, source, from_variable)
    return resolved
