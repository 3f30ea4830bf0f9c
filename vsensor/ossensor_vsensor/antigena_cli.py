"""The operator's client for Antigena: ``ossensor-vsensor antigena --url https://HOST:PORT ...``.

It talks to a running vSensor's operator API (``/api/v1/antigena/actions``) with the admin token
from ``VSENSOR_ADMIN_TOKEN``. The vSensor's certificate is verified against ``--ca-file`` (or the
system CAs), or pinned with ``--fingerprint SHA256``: then it is checked right after the
handshake, before the token is sent.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import ssl
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from ossensor_core.client.tls import normalise_fingerprint
from ossensor_core.wire.names import PATH_ACTIONS

ADMIN_TOKEN_VARIABLE = "VSENSOR_ADMIN_TOKEN"
#: Bytes of an answer read at most (a list of actions is a few KiB).
MAX_ANSWER_BYTES = 4 << 20


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float:
    """A finite number of seconds (argparse turns the ValueError into a usage error)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ossensor-vsensor antigena",
                     description="Issue, list and clear Antigena actions on a running vSensor.",
                     epilog=f"The admin token is read from ${ADMIN_TOKEN_VARIABLE}.")
    parser.add_argument("--url", required=True, metavar="https://HOST:PORT",
                        help="the running vSensor")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="CA bundle (PEM) that verifies the vSensor's certificate")
    parser.add_argument("--fingerprint", metavar="SHA256",
                        help="the vSensor certificate's SHA-256 fingerprint (64 hex digits, "
                             "colons allowed, as the vSensor logs it at start): pinned instead "
                             "of verified by a CA")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    block = commands.add_parser("block", help="block matching TCP connections; prints the id")
    block.add_argument("--src", metavar="ADDR", help="source address or network (CIDR)")
    block.add_argument("--dst", metavar="ADDR", help="destination address or network (CIDR)")
    block.add_argument("--sport", metavar="PORT", help="source port (for a full 5-tuple)")
    block.add_argument("--dport", metavar="PORT", help="destination port")
    block.add_argument("--duration", required=True, type=_seconds, metavar="SECONDS",
                       help="how long the action holds (at most 30 days)")
    block.add_argument("--start-in", type=_seconds, metavar="SECONDS",
                       help="start this many seconds from now (default: at once)")
    block.add_argument("--sensor", metavar="NAME", help="only this sensor enforces it")
    listing = commands.add_parser("list", help="the actions in force")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    clear = commands.add_parser("clear", help="end an action now")
    clear.add_argument("id", help="the action's id")
    return parser


class OperatorError(Exception):
    """A refused or failed operator request; the message is for the operator."""


class Endpoint:
    """Where the vSensor is and how its certificate is checked."""

    def __init__(self, url: str, ca_file: str | None, fingerprint: str | None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise OperatorError(f"--url {url!r}: expected https://HOST:PORT")
        try:
            self.port = parsed.port or 443
        except ValueError:
            raise OperatorError(f"--url {url!r}: the port is not a number 1-65535") from None
        self.url, self.host = url, parsed.hostname
        self.base = parsed.path.rstrip("/")
        self.pin: bytes | None = None
        if fingerprint is not None:
            try:
                self.pin = bytes.fromhex(normalise_fingerprint(fingerprint))
            except ValueError as exc:
                raise OperatorError(f"--fingerprint: {exc}") from None
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE  # the pin below is the check
        else:
            try:
                self.context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise OperatorError(f"--ca-file {ca_file!r}: cannot load it "
                                    f"({exc.strerror or exc})") from None
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def request(self, method: str, path: str, token: str,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; the parsed JSON answer, or OperatorError with the vSensor's reason."""
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                 timeout=15)
        try:
            connection.connect()
            if self.pin is not None:
                sock = connection.sock
                assert isinstance(sock, ssl.SSLSocket)
                der = sock.getpeercert(binary_form=True) or b""
                seen = hashlib.sha256(der).hexdigest()
                if seen != self.pin.hex():
                    raise OperatorError(
                        f"the certificate of {self.url} has fingerprint "
                        f"{':'.join(seen[i:i + 2] for i in range(0, 64, 2)).upper()}, not the "
                        "one given with --fingerprint (nothing was sent)")
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, self.base + path, body=data, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER_BYTES)
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            reason = (exc.reason if isinstance(exc, ssl.SSLError) else
                      exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
            raise OperatorError(f"cannot reach the vSensor at {self.url}: {reason}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if status >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise OperatorError(f"the vSensor refused ({status}): {error or response.reason}")
        if not isinstance(answer, dict):
            raise OperatorError(f"the vSensor at {self.url} answered something that is not a "
                                "JSON object")
        return answer


def run_cli(argv: Sequence[str], environ: dict[str, str]) -> int:
    """``ossensor-vsensor antigena ...``: exit 0 on success, 1 with a message otherwise."""
    args = build_parser().parse_args(list(argv))
    token = environ.get(ADMIN_TOKEN_VARIABLE, "")
    try:
        if not token:
            raise OperatorError(f"set {ADMIN_TOKEN_VARIABLE} to the vSensor's admin token")
        endpoint = Endpoint(args.url, args.ca_file, args.fingerprint)
        if args.command == "block":
            body: dict[str, Any] = {k: v for k, v in (
                ("src", args.src), ("dst", args.dst), ("sport", args.sport),
                ("dport", args.dport), ("sensor", args.sensor)) if v is not None}
            body["duration"] = args.duration
            if args.start_in is not None:
                body["start_in"] = args.start_in
            print(endpoint.request("POST", PATH_ACTIONS, token, body)["id"])
        elif args.command == "list":
            actions = endpoint.request("GET", PATH_ACTIONS, token).get("actions", [])
            if args.json:
                json.dump(actions, sys.stdout, indent=2)
                print()
            else:
                print(_table(actions))
        else:
            answer = endpoint.request(
                "DELETE", f"{PATH_ACTIONS}/{urllib.parse.quote(args.id, safe='')}", token)
            print(f"cleared {answer.get('cleared')}")
    except OperatorError as exc:
        print(f"ossensor-vsensor antigena: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _table(actions: list[dict[str, Any]]) -> str:
    head = ("ID", "SRC", "DST", "SPORT", "DPORT", "SENSOR", "EXPIRES IN")
    now = time.time()
    rows = [(str(a.get("id")), a.get("src") or "*", a.get("dst") or "*",
             str(a.get("sport") or "*"), str(a.get("dport") or "*"), a.get("sensor") or "*",
             f"{max(float(a.get('expiry', now)) - now, 0):.0f} s") for a in actions]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in (head, *rows))
