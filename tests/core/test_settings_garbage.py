"""Every setting of the core and of every built-in plugin, fed garbage: ``ossensor check`` says
one line per problem, each naming its variable, exits 1, never shows a traceback or the key.

The settings are enumerated from the code (as ``tests/helpers/manifests.py`` does), so a new
setting is covered without touching this file. Values are grouped by kind; one process takes a
value of one kind in every setting at once (start-up reports all problems together), except the
settings that decide what is loaded or selected, which run alone. ``ossensor check`` runs in a namespace
of its own (one veth pair, a default route), so that interfaces that come and go on the machine
do not change its answers; it writes its file into the case's folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import pytest

from ossensor_core.pipeline.config import CORE_SETTINGS, ENV_CA_FILE, ENV_FINGERPRINT
from ossensor_core.pipeline.loading import GROUPS, installed_plugins
from ossensor_core.pipeline.settings import Setting
from ossensor_core.client.tls import connection_settings
from tests.helpers.forked import Case, Ran, run_forked
from tests.helpers.netns import Namespace, have_netns, namespaces

KEY = "Kx9secretHMACkey42"
REFUSE, EITHER = "refused", "either"
#: Settings that choose what is loaded or which interfaces are captured: one per process, as a
#: bad one ends plugin loading or names its partner list in its line.
ALONE = {"OSSENSOR_CAPTURE_BACKEND", "OSSENSOR_TRANSPORT", "OSSENSOR_PLUGINS",
         "OSSENSOR_DISABLE_PLUGINS", "NETWORK_DEVICE_EXCLUDELIST", "NETWORK_DEVICE_INCLUDELIST",
         "NETWORK_DEVICE_BLACKLIST", "NETWORK_DEVICE_WHITELIST", "OSSENSOR_NETWORK_DEVICE",
         "ANTIGENA_ENABLED", "OSSENSOR_SLICE_BYTES", "OSSENSOR_SLICE_PACKETS",
         "VSENSOR_HMAC_KEY"}  # alone: no other line may quote its value
#: A bad value must be refused for these kinds of setting; other settings may take it.
NUMBER_GARBAGE = {
    "huge": b"1" + b"0" * 30, "huge-negative": b"-1" + b"0" * 30, "1e308": b"1e308",
    "word": b"SHA-256", "nan": b"NaN", "inf": b"inf", "minus-inf": b"-Infinity",
    "underscore": b"1_000", "hex": b"0x10", "other-digits": "١٢".encode(), "1.5e": b"1.5e",
    "5000-digits": b"9" * 5000,
}
EVERY_GARBAGE = {"not-utf8": b"\xff\xfe\xfd", "control": b"a\x01b", "1mb": b"9" * 1_000_000}
FINGERPRINTS = {"SHA-256": b"SHA-256", "63-hex": b"a" * 63, "non-hex": b"g" * 64,
                "65-hex": b"a" * 65, "prefixed": b"sha256:" + b"ab" * 32}


@dataclass(frozen=True)
class Variable:
    name: str
    setting: Setting
    stage: str | None  # the plugin's stage (None: the core's)
    plugin: str | None


def variables() -> list[Variable]:
    """Every variable the sensor reads, with the plugin that declares it."""
    found = [Variable(s.variable(None), s, None, None) for s in CORE_SETTINGS]
    found += [Variable(old, s, None, None) for s in CORE_SETTINGS for old in s.legacy]
    group = connection_settings()
    found += [Variable(s.variable(group.plugin), s, None, None) for s in group.settings]
    for entry_group, stage in GROUPS.items():
        for info in installed_plugins(entry_group):
            if not info.target.startswith("ossensor_plugins."):
                continue
            module_name, _, attribute = info.target.partition(":")
            obj = import_module(module_name)
            for part in filter(None, attribute.split(".")):
                obj = getattr(obj, part)
            declared = obj.ossensor_settings()
            found += [Variable(s.variable(declared.plugin), s, stage, info.name)
                      for s in declared.settings]
    return found


def is_path(variable: Variable) -> bool:
    return variable.setting.type is str and variable.name.endswith(("_PATH", "_DIR", "_FILE"))


def values_for(variable: Variable, folder: Path) -> dict[str, tuple[bytes, str]]:
    """value kind -> (bytes, REFUSE or EITHER) for one variable."""
    setting = variable.setting
    empty = REFUSE if setting.required else EITHER
    found = {"empty": (b"", empty), "blank": (b"  ", empty)}
    found.update({kind: (value, REFUSE) for kind, value in EVERY_GARBAGE.items()})
    numeric = setting.type in (int, float)
    if setting.type is not str:
        found.update({kind: (value, REFUSE) for kind, value in NUMBER_GARBAGE.items()})
        negative_ok = numeric and not setting.positive and (setting.minimum or 0) < 0
        found["negative"] = (b"-1", EITHER if negative_ok else REFUSE)
        if setting.type is int:
            found["fraction"] = (b"1.5", REFUSE)
    else:
        found.update({kind: (value, EITHER) for kind, value in NUMBER_GARBAGE.items()})
    if variable.name == ENV_FINGERPRINT:
        found.update({kind: (value, REFUSE) for kind, value in FINGERPRINTS.items()})
    if is_path(variable):
        must = REFUSE if variable.name == ENV_CA_FILE else EITHER
        found.update({"missing": (bytes(folder / "missing" / "x"), must),
                      "folder": (bytes(folder), must), "fifo": (bytes(folder / "fifo"), must),
                      "junk-file": (bytes(folder / "junk"), must),
                      "under-a-file": (bytes(folder / "junk" / "x"), REFUSE)})
    return found


def profiles(folder: Path) -> dict[str, dict[bytes, bytes]]:
    """Base environments that load every built-in plugin between them."""
    base = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), b"LANG": b"C.UTF-8",
            b"VSENSOR_HOSTNAME": b"vsensor.test", b"VSENSOR_HMAC_KEY": KEY.encode(),
            b"OSSENSOR_CONFIG_PATH": b"ossensor.cfg", b"OSSENSOR_LOGFILE_PATH": b"sensor.log",
            b"OSSENSOR_PLUGINS": b"dedup slice", b"OSSENSOR_SLICE_BYTES": b"128",
            b"OSSENSOR_SLICE_PACKETS": b"10"}
    return {
        "afpacket+https": {**base, b"OSSENSOR_CAPTURE_BACKEND": b"afpacket",
                           b"OSSENSOR_TRANSPORT": b"https",
                           b"OSSENSOR_SPOOL_DIR": bytes(folder / "spool")},
        "scapy+file": {**base, b"OSSENSOR_CAPTURE_BACKEND": b"scapy",
                       b"OSSENSOR_TRANSPORT": b"file",
                       b"OSSENSOR_OUTPUT_DIR": bytes(folder / "out")},
    }


def loaded_in(variable: Variable, profile: dict[bytes, bytes]) -> bool:
    if variable.stage == "capture":
        return profile[b"OSSENSOR_CAPTURE_BACKEND"] == variable.plugin.encode()
    if variable.stage == "transport":
        return profile[b"OSSENSOR_TRANSPORT"] == variable.plugin.encode()
    return True  # the core's, Antigena's (on by default) and the filters' (in OSSENSOR_PLUGINS)


@dataclass
class Batch:
    profile: str
    kind: str
    bad: dict[str, tuple[bytes, str]]  # variable -> (value, expectation)
    case: Case


def batches(folder: Path) -> Iterator[Batch]:
    everything = variables()
    for profile_name, profile in profiles(folder).items():
        mine = [v for v in everything if loaded_in(v, profile)]
        kinds: dict[str, dict[str, tuple[bytes, str]]] = {}
        alone: list[tuple[str, str, tuple[bytes, str]]] = []
        for variable in mine:
            for kind, value in values_for(variable, folder).items():
                if variable.name in ALONE:
                    if profile_name == "afpacket+https":  # the core's choices: once is enough
                        alone.append((kind, variable.name, value))
                else:
                    kinds.setdefault(kind, {})[variable.name] = value
        groups = [(kind, bad) for kind, bad in kinds.items()]
        groups += [(kind, {name: value}) for kind, name, value in alone]
        for kind, bad in groups:
            env = dict(profile)
            env.update({name.encode(): value for name, (value, _) in bad.items()})
            yield Batch(profile_name, kind, bad, Case(env, (b"check",)))


def names_in(line: str, candidates: set[str]) -> set[str]:
    return {name for name in candidates if re.search(rf"(?<![A-Z_]){name}(?![A-Z_])", line)}


def judge(batch: Batch, ran: Ran, all_names: set[str]) -> list[str]:
    """What is wrong with one run, as sentences (empty: nothing)."""
    wrong = []
    where = f"{batch.profile}/{batch.kind}"
    output = ran.stdout + ran.stderr
    if "Traceback" in output:
        wrong.append(f"{where}: a traceback: {ran.stderr[-2000:]}")
    if KEY in output:
        wrong.append(f"{where}: the key appears")
    secret = batch.bad.get("VSENSOR_HMAC_KEY")
    if secret and len(secret[0]) >= 6 and os.fsdecode(secret[0])[:20] in output:
        wrong.append(f"{where}: the bad key's value appears")
    lines = ran.stderr.splitlines()
    if ran.code not in (0, 1) or (ran.code == 1) != bool(lines):
        wrong.append(f"{where}: exit {ran.code} with {len(lines)} lines on stderr")
    if ran.code == 0:
        json.loads(ran.stdout)
    named: dict[str, int] = {}
    for line in lines:
        if not line.startswith("ossensor: cannot start: "):
            wrong.append(f"{where}: not a problem line: {line[:300]!r}")
            continue
        found = names_in(line, set(batch.bad))
        if len(found) != 1:
            wrong.append(f"{where}: names {sorted(found) or 'none'} of the bad variables "
                         f"({len(line)} characters): {line[:300]!r}")
        for name in found:
            named[name] = named.get(name, 0) + 1
    for name, (_, expect) in batch.bad.items():
        count = named.get(name, 0)
        if count > 1 or (expect == REFUSE and count != 1):
            wrong.append(f"{where}: {name} named in {count} lines, expected "
                         f"{'1' if expect == REFUSE else '0 or 1'}")
    return wrong


@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (space,):
        space.ip("link", "add", "eth0", "type", "veth", "peer", "name", "veth0")
        for name in ("eth0", "veth0"):
            space.ip("link", "set", name, "up")
        space.ip("addr", "add", "192.0.2.10/24", "dev", "eth0")
        space.ip("route", "add", "default", "via", "192.0.2.1")
        yield space


def warmup(folder: Path) -> str:
    """Code for the driver: start-up once per profile, so that children start warm."""
    envs = [{os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}
            for env in profiles(folder).values()]
    return ("from ossensor_core.pipeline.startup import prepare\n"
            f"for env in {envs!r}:\n"
            "    try:\n"
            "        prepare(env, write_config=False)\n"
            "    except Exception:\n"
            "        pass\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("garbage")
    (folder / "junk").write_bytes(b"\x00garbage, not PEM\n")
    os.mkfifo(folder / "fifo")
    return folder


def test_every_setting_refuses_garbage_in_one_line_naming_it(ns: Namespace, folder: Path,
                                                            tmp_path: Path) -> None:
    work = list(batches(folder))
    ran = run_forked("ossensor_core.ops.cli", "ossensor", [b.case for b in work], tmp_path,
                     preload=["ossensor_core.pipeline.startup"], warmup=warmup(folder),
                     prefix=ns.prefix())
    pairs = sum(len(b.bad) for b in work)
    print(f"{pairs} (setting, value) pairs in {len(work)} processes")
    all_names = {v.name for v in variables()}
    wrong = [problem for batch, result in zip(work, ran)
             for problem in judge(batch, result, all_names)]
    assert not wrong, f"{len(wrong)} findings:\n" + "\n".join(wrong[:40])


def test_the_issues_fingerprint_slip_in_a_process_of_its_own(ns: Namespace, tmp_path: Path) -> None:
    """``VSENSOR_TLS_FINGERPRINT=SHA-256`` (issue 16) and a value that is not UTF-8, exec'd as
    a user runs it: one line each, naming the variable, exit 1."""
    env = {**profiles(tmp_path)["afpacket+https"], b"VSENSOR_TLS_FINGERPRINT": b"SHA-256",
           b"OSSENSOR_DEBUG": b"\xff", b"PYTHONPATH": os.environb.get(b"PYTHONPATH", b"")}
    done = subprocess.run([*ns.prefix(), sys.executable, "-m", "ossensor_core.ops.cli", "check"],
                          env=env, cwd=tmp_path, capture_output=True, timeout=60)
    lines = done.stderr.decode(errors="backslashreplace").splitlines()
    assert done.returncode == 1, lines
    assert lines == [
        "ossensor: cannot start: OSSENSOR_DEBUG: is not valid UTF-8",
        "ossensor: cannot start: VSENSOR_TLS_FINGERPRINT: 'SHA-256' is not a SHA-256 "
        "fingerprint (64 hex digits, colons allowed)"]
