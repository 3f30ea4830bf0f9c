"""Every option of ``ossensor-vsensor`` (from its argparse parser) and its two secrets, fed
garbage: exit 1 before listening, one line naming the option, no traceback, never the key.

The vSensor stops at its first problem, so each (option, value) is a process of its own: forked
from a warm driver (``tests/helpers/forked.py``) in a namespace of its own, each with its own
port on 127.0.0.1. A value that is accepted makes it listen; it is then stopped with SIGTERM
and must exit 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from ossensor_vsensor.cli import ADMIN_TOKEN_VARIABLE, KEY_VARIABLE, build_parser
from tests.helpers.forked import Case, Ran, run_forked
from tests.helpers.netns import Namespace, have_netns, namespaces

KEY = "Kx9secretHMACkey42"
REFUSE, EITHER = "refused", "either"
NUMBERS = {
    "empty": b"", "blank": b" ", "zero": b"0", "negative": b"-1", "huge": b"1" + b"0" * 30,
    "1e308": b"1e308", "word": b"SHA-256", "nan": b"nan", "inf": b"inf", "minus-inf": b"-inf",
    "underscore": b"1_000", "hex": b"0x10", "other-digits": "١٢".encode(),
    "not-utf8": b"\xff\xfe", "control": b"1\x01", "1mb": b"9" * 1_000_000,
}
NETWORKS = {
    "empty": b"", "word": b"SHA-256", "no-prefix": b"10.0.0.1", "host-bits": b"10.1.2.3/8",
    "scope": b"fe80::/64%eth0", "empty-item": b"10.0.0.0/8,", "not-utf8": b"\xff/8",
    "control": b"10.0.0.0/8\x01", "1mb": b"1" * 1_000_000,
}
ADDRESSES = {
    "empty": b"", "word": b"SHA-256", "no-port": b"127.0.0.1", "port-0": b"127.0.0.1:0",
    "port-huge": b"127.0.0.1:" + b"9" * 30, "port-negative": b"127.0.0.1:-1",
    "bad-ipv6": b"[zz::1]:8443", "space": b"a b:8443", "not-utf8": b"\xff:8443",
    "control": b"a\x01:8443", "1mb": b"a" * 1_000_000 + b":1",
}
#: Options that only ever name a path to read (a file that must hold something usable).
FILES = {"--tls-cert", "--tls-key", "--hmac-key-file"}


@dataclass
class Trial:
    option: str
    kind: str
    expect: str
    case: Case


def options() -> list[argparse.Action]:
    return [a for a in build_parser()._actions
            if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                       argparse._VersionAction))]


def path_values(folder: Path, option: str) -> dict[str, tuple[bytes, str]]:
    must = REFUSE if option in FILES else EITHER
    return {"empty": (b"", REFUSE), "not-utf8": (b"\xff\xfe", REFUSE),
            "1mb": (b"d" * 1_000_000, REFUSE), "missing": (bytes(folder / "missing"), must),
            "folder": (bytes(folder), must), "fifo": (bytes(folder / "fifo"), must),
            "dev-zero": (b"/dev/zero", must), "junk": (bytes(folder / "junk"), must),
            "under-a-file": (bytes(folder / "junk" / "x"), REFUSE)}


def trials(folder: Path, cert: Path, key: Path) -> Iterator[Trial]:
    base_env = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), b"LANG": b"C.UTF-8",
                KEY_VARIABLE.encode(): KEY.encode()}
    port = iter(range(20000, 30000))

    def argv(option: str, value: bytes) -> list[bytes]:
        given = {"--listen": b"127.0.0.1:%d" % next(port), "--data-dir": b"data",
                 "--tls-cert": bytes(cert), "--tls-key": bytes(key), option: value}
        return [name.encode() + b"=" + item for name, item in given.items()]

    for action in options():
        option = action.option_strings[-1]
        if action.type is None or action.type is str:
            values = {kind: (value, REFUSE) for kind, value in ADDRESSES.items()}
        elif action.type.__name__ in ("int", "float"):
            values = {kind: (value, REFUSE) for kind, value in NUMBERS.items()}
        else:
            values = path_values(folder, option)
        if option == "--claims-allow":  # networks, not addresses
            values = {kind: (value, REFUSE) for kind, value in NETWORKS.items()}
        if option == "--proxy-protocol-from":  # networks, or one balancer's address
            values = {kind: (value, REFUSE) for kind, value in NETWORKS.items()}
            values["no-prefix"] = (NETWORKS["no-prefix"], EITHER)
        if option == "--clock-offset-seconds":  # for testing: any finite number in range
            values.update({"zero": (b"0", EITHER), "negative": (b"-1", EITHER)})
        if option == "--data-dir":  # a folder, created when missing
            values.update({"folder": (bytes(folder / "data-here"), EITHER),
                           "missing": (bytes(folder / "new" / "data"), EITHER)})
        for kind, (value, expect) in values.items():
            yield Trial(option, kind, expect, Case(base_env, argv(option, value)))
    for variable in (KEY_VARIABLE, ADMIN_TOKEN_VARIABLE):
        for kind, value in {"not-utf8": b"\xff\xfe" * 8, "1mb": b"k" * 1_100_000}.items():
            yield Trial(variable, kind, REFUSE,
                        Case({**base_env, variable.encode(): value}, argv("--data-dir", b"data")))


def judge(trial: Trial, ran: Ran) -> list[str]:
    where = f"{trial.option}/{trial.kind}"
    output = ran.stdout + ran.stderr
    wrong = []
    if "Traceback" in output:
        wrong.append(f"{where}: a traceback: {ran.stderr[-1500:]}")
    if KEY in output:
        wrong.append(f"{where}: the key appears")
    if trial.kind in ("not-utf8", "1mb") and trial.option.startswith("VSENSOR_") and \
            ("\\udcff" in output or "kkkkkkkk" in output):
        wrong.append(f"{where}: the secret appears")
    lines = ran.stderr.splitlines()
    if ran.code == 0 and trial.expect == REFUSE:
        wrong.append(f"{where}: accepted (exit 0)")
    elif ran.code == 1:
        if len(lines) != 1 or not lines[0].startswith("ossensor-vsensor: error: ") \
                or trial.option not in lines[0]:
            wrong.append(f"{where}: not one line naming {trial.option}: "
                         f"{[line[:300] for line in lines[:5]]}")
    elif ran.code != 0:
        wrong.append(f"{where}: exit {ran.code}: {ran.stderr[-300:]!r}")
    return wrong


@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (space,):
        yield space


def test_every_option_refuses_garbage_in_one_line_naming_it(ns: Namespace,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "things"
    folder.mkdir()
    (folder / "junk").write_bytes(b"\xff\x00 garbage, not PEM\n")
    os.mkfifo(folder / "fifo")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    cert, key = folder / "cert.pem", folder / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    work = list(trials(folder, cert, key))
    ran = run_forked("ossensor_vsensor.cli", "ossensor-vsensor", [t.case for t in work],
                     tmp_path / "runs", preload=["ossensor_vsensor.app", "ossensor_vsensor.server"],
                     prefix=ns.prefix(), stop_after=4)
    print(f"{len(work)} (option, value) pairs, {sum(r.code == 0 for r in ran)} accepted")
    wrong = [problem for trial, result in zip(work, ran) for problem in judge(trial, result)]
    assert not wrong, f"{len(wrong)} findings:\n" + "\n".join(wrong[:40])


def test_bytes_that_are_not_utf8_in_argv_of_a_process_of_its_own(tmp_path: Path) -> None:
    """Exec'd with raw bytes in argv, as a shell passes them: one line, exit 1, nothing
    listens (no port is free to take: the listen address is refused first)."""
    env = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), b"LANG": b"C.UTF-8",
           b"PYTHONPATH": os.environb.get(b"PYTHONPATH", b""), KEY_VARIABLE.encode(): KEY.encode()}
    done = subprocess.run([sys.executable.encode(), b"-m", b"ossensor_vsensor.cli",
                           b"--listen=127.0.0.1:20000", b"--data-dir=" + bytes(tmp_path),
                           b"--skew-seconds=\xff"], env=env, capture_output=True, timeout=60)
    lines = done.stderr.decode(errors="backslashreplace").splitlines()
    assert done.returncode == 1
    assert len(lines) == 1 and "--skew-seconds" in lines[0] and "Traceback" not in lines[0], lines
