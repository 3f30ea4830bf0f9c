"""``ossensor-vsensor``: run the reference vSensor over HTTPS.

Keys come from ``VSENSOR_HMAC_KEY`` (several separated by commas or white space, for a key
rotation) and/or ``--hmac-key-file`` (one key per line, repeatable); the admin token for the
status pages from ``VSENSOR_ADMIN_TOKEN``. Without ``--tls-cert`` a self-signed certificate is
made in ``DATA_DIR/.tls`` on first start and its SHA-256 fingerprint is logged. SIGTERM and
SIGINT complete the open files and exit 0. Bad input exits 1 with a message naming the option;
no message ever contains a key.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import re
import resource
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


from ossensor_core.runtime.heap import snapshots_on_signal
from ossensor_core.runtime.memory import keep_buffers_mapped, tidy_periodically
from ossensor_core.runtime.threads import named_executor

from . import __version__
from .action_store import ActionFileError
from .app import VSENSOR, create_app
from .claims import parse_allow
from .cluster.connection import ClusterSettings
from .server import start_guarded
from .settings import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, VSensorSettings
from .tls import certificate_fingerprint, ensure_self_signed, server_context

log = logging.getLogger("ossensor_vsensor")

KEY_VARIABLE = "VSENSOR_HMAC_KEY"
ADMIN_TOKEN_VARIABLE = "VSENSOR_ADMIN_TOKEN"
#: Keys and tokens shorter than this are warned about at start.
MIN_SECRET_LENGTH = 16
#: The largest key file read; a key is a line.
MAX_KEY_FILE_BYTES = 1 << 20
#: Characters of a bad value quoted in a message.
SHOWN = 160


class UsageError(Exception):
    """Bad command-line input; the message names the option and never holds a key."""


def shown(text: object) -> str:
    """A value quoted for a message, cut to :data:`SHOWN` characters."""
    text = str(text)
    if len(text) <= SHOWN:
        return repr(text)
    return f"{text[:SHOWN]!r}... ({len(text)} characters)"


def number(kind: type, low: float, high: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a plain ASCII ``kind`` (int or float), finite, in ``[low, high]``
    (``(low, high]`` with ``above``). ``float()`` alone takes ``nan``, ``inf`` and ``1_0``."""
    pattern = (r"[+-]?[0-9]+" if kind is int
               else r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")

    def parse(text: str) -> float:
        if not re.fullmatch(pattern, text.strip()):
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{shown(text)} is not {what}")
        value = kind(text.strip())
        if not math.isfinite(value) or value > high or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(
                f"{shown(text)} is not {'above' if above else 'at least'} {low:g} and at most "
                f"{high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _path(text: str) -> Path:
    """An argparse type: a path of a sane length, as UTF-8 (``os.fsdecode`` keeps other bytes
    as lone surrogates, which no message or status page can show)."""
    if len(text) > 4096:
        raise argparse.ArgumentTypeError(f"{shown(text)} is longer than 4096 characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8") from None
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return Path(text)


def read_small_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit``: a FIFO or a device (``/dev/zero``) would block
    start-up or fill the memory. Raises OSError or ValueError with a reason."""
    with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 1 (not argparse's 2), like other bad input
        # One line: the problem, naming the option (the usage is one --help away).
        self.exit(1, f"{self.prog}: error: {' '.join(message.splitlines())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ossensor-vsensor", description=__doc__.split("\n\n")[0],
                     epilog=f"Keys: ${KEY_VARIABLE} and/or --hmac-key-file. "
                            f"Admin token for /status, /status.json, /metrics: "
                            f"${ADMIN_TOKEN_VARIABLE}. Antigena actions: "
                            f"ossensor-vsensor antigena --help.")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to listen on, e.g. 0.0.0.0:8443 or [::1]:8443")
    parser.add_argument("--data-dir", required=True, type=_path, metavar="DIR",
                        help="where DIR/<sensor>/*.pcapng (and a self-signed certificate) go")
    parser.add_argument("--tls-cert", type=_path, metavar="FILE",
                        help="PEM certificate (chain); default: self-signed in DIR/.tls")
    parser.add_argument("--tls-key", type=_path, metavar="FILE", help="PEM key for --tls-cert")
    parser.add_argument("--hmac-key-file", type=_path, action="append", default=[],
                        metavar="FILE", help="file with one accepted key per line (repeatable)")
    parser.add_argument("--skew-seconds", type=number(float, 0, 86400, above=True), default=300.0, metavar="N",
                        help="accepted clock difference to a sensor (default 300)")
    add_file_options(parser, "of all sensors")
    parser.add_argument("--heartbeat-seconds", type=number(float, 0, 3600, above=True),
                        default=10.0, metavar="N",
                        help="heartbeat interval given to sensors (default 10)")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="address sensors should use once registered (this vSensor's own "
                             "address behind a load balancer they register through)")
    parser.add_argument("--sensor-port", type=number(int, 1, 65535), action="append", default=[], metavar="PORT",
                        help="port sensors connect to when it differs from the listen port "
                             "(NAT, load balancer); repeatable")
    parser.add_argument("--clock-offset-seconds", type=number(float, -1e9, 1e9), default=0.0, metavar="N",
                        help="for testing only: act as if this clock were N seconds ahead "
                             "(negative: behind), to reproduce a clock skew")
    parser.add_argument("--max-connections", type=number(int, 1, 1_000_000),
                        default=MAX_CONNECTIONS, metavar="N",
                        help="connections (and requests in flight) at once, beyond which new "
                             f"ones are reset before TLS (default {MAX_CONNECTIONS})")
    parser.add_argument("--max-connections-per-address", type=number(int, 1, 1_000_000),
                        default=MAX_CONNECTIONS_PER_ADDRESS, metavar="N",
                        help="the same from one client address (default "
                             f"{MAX_CONNECTIONS_PER_ADDRESS}; raise it behind a NAT or a load "
                             "balancer that hides the sensors' addresses)")
    parser.add_argument("--claims-allow", action="append", default=[], metavar="CIDR[,CIDR]",
                        help="networks sensors may claim as their addresses and workloads, "
                             "besides the private, shared and unique-local ones (e.g. public "
                             "node addresses); repeatable")
    parser.add_argument("--claims-max-prefix", type=number(int, 1, 32), default=16, metavar="N",
                        help="widest IPv4 claim taken, as a prefix length (default 16)")
    parser.add_argument("--claims-max-prefix6", type=number(int, 1, 128), default=48,
                        metavar="N",
                        help="widest IPv6 claim taken, as a prefix length (default 48)")
    parser.add_argument("--proxy-protocol-from", action="append", default=[],
                        metavar="CIDR[,CIDR]",
                        help="addresses of TCP load balancers that send a PROXY header "
                             "(HAProxy send-proxy-v2): the client address is taken from it")
    cluster = parser.add_argument_group(
        "cluster mode", "replicas sharing their state through NATS JetStream (docs/cluster.md)")
    cluster.add_argument("--nats", metavar="URL[,URL...]",
                         help="NATS servers (nats:// or tls://): run as a replica of a cluster; "
                              "needs --tls-cert")
    cluster.add_argument("--replica", metavar="NAME",
                         help="this replica's name in the cluster (default: the host name)")
    add_stream_options(cluster, "beyond it sensors are answered 507 until store workers catch "
                                "up")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_file_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                     scope: str) -> None:
    """How pcapng files are rotated and kept, as the vSensor and its store workers take them;
    ``scope``: whose completed files ``--retain-bytes`` bounds."""
    parser.add_argument("--rotate-bytes", type=number(int, 1, 1 << 40), default=100 << 20,
                        metavar="N", help="complete a pcapng file at this size (default 100 MiB)")
    parser.add_argument("--rotate-seconds", type=number(float, 0, 7 * 86400, above=True),
                        default=300.0, metavar="N",
                        help="complete a pcapng file this long after it was opened (default 300)")
    parser.add_argument("--retain-seconds", type=number(float, 0, 1e9, above=True), metavar="N",
                        help="delete completed pcapng files older than N seconds "
                             "(default: keep them)")
    parser.add_argument("--retain-bytes", type=number(int, 1, 1 << 60), metavar="N",
                        help=f"keep the completed pcapng files {scope} under N bytes, deleting "
                             "the oldest first (default: no limit)")


def add_stream_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                       limit: str) -> None:
    """The copies and the size limit of cluster mode's stream (``--nats-replicas``,
    ``--nats-stream-max-bytes``); ``limit``: what the size limit does for this process."""
    parser.add_argument("--nats-replicas", type=number(int, 1, 5), default=3, metavar="N",
                        help="copies JetStream keeps of the stream and buckets (default 3)")
    parser.add_argument("--nats-stream-max-bytes", type=number(int, 1 << 20, 1 << 50),
                        default=4 << 30, metavar="N",
                        help=f"size limit of the chunk stream: {limit} (default 4 GiB)")


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z0-9]+)\]:([0-9]{1,5})|([^:\[\]]{0,253}):([0-9]{1,5})",
                         text.strip())
    if not match:
        raise UsageError(f"{option} {shown(text)}: expected HOST:PORT or [IPv6]:PORT")
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise UsageError(f"{option} {shown(text)}: port {port} is not between 1 and 65535")
    if match.group(1) is not None:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise UsageError(f"{option} {shown(text)}: {shown(host)} is not an IPv6 address") \
                from None
    elif host and not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        raise UsageError(f"{option} {shown(text)}: {shown(host)} is not a host name or address")
    if not host and option != "--listen":
        raise UsageError(f"{option} {shown(text)}: a host is needed")
    return host or "0.0.0.0", port


def _secret_text(variable: str, environ: dict[str, str]) -> str:
    """A secret from the environment, refused (never shown) unless it is short UTF-8 text."""
    text = environ.get(variable, "")
    if len(text) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"{variable}: longer than {MAX_KEY_FILE_BYTES} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{variable}: is not valid UTF-8 (not shown: it is secret)") from None
    return text


def load_keys(environ: dict[str, str], key_files: Sequence[Path]) -> list[str]:
    keys = [k for k in re.split(r"[,\s]+", _secret_text(KEY_VARIABLE, environ)) if k]
    for path in key_files:
        try:
            text = read_small_file(Path(path), MAX_KEY_FILE_BYTES).decode("utf-8")
        except (OSError, ValueError) as exc:
            reason = ((isinstance(exc, OSError) and exc.strerror)
                      or (isinstance(exc, UnicodeDecodeError) and "not UTF-8") or exc)
            raise UsageError(f"--hmac-key-file {shown(path)}: cannot read it ({reason})") from None
        found = [line.strip() for line in text.splitlines() if line.strip()]
        if not found:
            raise UsageError(f"--hmac-key-file {shown(path)}: holds no key")
        keys += found
    if not keys:
        raise UsageError(f"no HMAC key: set {KEY_VARIABLE} or pass --hmac-key-file")
    return list(dict.fromkeys(keys))  # rotation order kept, duplicates dropped


def prepare(args: argparse.Namespace, environ: dict[str, str]):
    """Validate everything before listening; return (settings, host, port, ssl context)."""
    host, port = parse_listen(args.listen)
    keys = load_keys(environ, args.hmac_key_file)
    admin_token = _secret_text(ADMIN_TOKEN_VARIABLE, environ)  # numbers: checked by argparse
    try:
        parse_allow(args.claims_allow)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data_dir: Path = args.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--data-dir {shown(data_dir)}: cannot create it "
                         f"({exc.strerror or exc})") from None
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {shown(data_dir)}: is not a folder")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    cluster = cluster_settings(args)
    balancers = parse_networks("--proxy-protocol-from", args.proxy_protocol_from)
    direct = (parse_listen(args.advertise, "--advertise") if args.advertise is not None
              else None)  # an empty value is a slip (an unset variable), not "none"
    if args.tls_cert:
        cert_file, key_file = args.tls_cert, args.tls_key
    else:
        try:
            cert_file, key_file, created = ensure_self_signed(
                data_dir, host, direct[0] if direct else None)
        except OSError as exc:
            raise UsageError(f"--data-dir {shown(data_dir)}: cannot keep a self-signed "
                             f"certificate there ({exc.strerror or exc})") from None
        log.info("%s self-signed certificate %s", "created" if created else "using", cert_file)
    try:
        for path in (cert_file, key_file):  # a FIFO or a device would block the load
            read_small_file(path, MAX_KEY_FILE_BYTES)
        context = server_context(cert_file, key_file)
        fp = certificate_fingerprint(cert_file)
    except (OSError, ValueError) as exc:
        reason = (isinstance(exc, OSError) and exc.strerror) or exc
        raise UsageError(f"--tls-cert {shown(cert_file)} / --tls-key {shown(key_file)}: "
                         f"cannot load ({' '.join(str(reason).splitlines())})") from None
    log.info("TLS certificate SHA-256 fingerprint: %s", fp)
    settings = VSensorSettings(
        data_dir=data_dir, keys=keys, admin_token=admin_token or None,
        skew_seconds=args.skew_seconds, rotate_bytes=args.rotate_bytes,
        rotate_seconds=args.rotate_seconds, heartbeat_seconds=args.heartbeat_seconds,
        vsensor_ports=tuple(args.sensor_port) or (port,),
        retain_seconds=args.retain_seconds, retain_bytes=args.retain_bytes,
        clock_offset=args.clock_offset_seconds, direct=direct,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        max_requests=args.max_connections,
        max_requests_per_address=args.max_connections_per_address,
        claims_allow=tuple(args.claims_allow), claims_max_prefix_v4=args.claims_max_prefix,
        claims_max_prefix_v6=args.claims_max_prefix6, cluster=cluster,
        proxy_protocol_from=balancers)
    return settings, host, port, context


def parse_networks(option: str, values: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated CIDRs of a repeatable option, checked."""
    networks = []
    for text in (part.strip() for value in values for part in value.split(",")):
        try:
            networks.append(str(ipaddress.ip_network(text)))
        except ValueError:
            raise UsageError(f"{option} {shown(text)}: not an address or a CIDR network "
                             "(without host bits)") from None
    return tuple(networks)


def cluster_settings(args: argparse.Namespace) -> ClusterSettings | None:
    """``--nats`` and its options, checked; None in single mode."""
    if args.nats is None:
        if args.replica is not None:
            raise UsageError("--replica needs --nats (cluster mode)")
        return None
    if not args.tls_cert:
        # Replicas sit behind a load balancer and are reached directly too: one certificate
        # must cover every name, and a self-signed one per replica would not.
        raise UsageError("--nats needs --tls-cert and --tls-key: one certificate for the "
                         "load-balanced name and every replica's --advertise name")
    try:
        import nats  # noqa: F401
    except ImportError:
        raise UsageError("--nats needs the nats-py package: pip install "
                         "'ossensor-vsensor[cluster]'") from None
    try:
        return ClusterSettings(tuple(args.nats.split(",")), replicas=args.nats_replicas,
                               stream_max_bytes=args.nats_stream_max_bytes,
                               **({"name": args.replica} if args.replica else {}))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def warn_about(settings: VSensorSettings) -> None:
    """Warnings at start for what works but is weak: open status pages, short secrets, a
    descriptor limit below the connection cap. Never the secrets themselves."""
    if not settings.admin_token:
        log.warning("the status pages (/status, /status.json, /metrics) are open to anyone who "
                    "can reach this port: set %s", ADMIN_TOKEN_VARIABLE)
    elif len(settings.admin_token) < MIN_SECRET_LENGTH:
        log.warning("%s is shorter than %d characters: easy to guess", ADMIN_TOKEN_VARIABLE,
                    MIN_SECRET_LENGTH)
    short = [i + 1 for i, key in enumerate(settings.keys) if len(key) < MIN_SECRET_LENGTH]
    if short:
        log.warning("HMAC key%s number %s %s shorter than %d characters: easy to guess",
                    "s" if len(short) > 1 else "", ", ".join(map(str, short)),
                    "are" if len(short) > 1 else "is", MIN_SECRET_LENGTH)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < settings.max_connections + 1024:
        log.warning("the open-files limit (%d) is below --max-connections (%d) plus room for "
                    "files: connections beyond it will fail to be accepted", soft,
                    settings.max_connections)


async def serve(settings: VSensorSettings, host: str, port: int, context) -> None:
    # Decoding, storing and filters run in this pool: all of its threads start now, so the
    # thread count after a busy month is the one after start-up (make soak checks it).
    asyncio.get_running_loop().set_default_executor(named_executor("vsensor", start_all=True))
    app = create_app(settings)
    try:
        runner, _ = await start_guarded(app, settings, app[VSENSOR].counts, host, port, context)
    except OSError as exc:
        raise UsageError(f"--listen {host}:{port}: cannot listen "
                         f"({exc.strerror or exc})") from None
    try:
        log.info("vSensor %s listening on https://%s:%d/, storing under %s (%d key%s)",
                 __version__, f"[{host}]" if ":" in host else host, port, settings.data_dir,
                 len(settings.keys), "" if len(settings.keys) == 1 else "s")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tidying = asyncio.create_task(tidy_periodically(), name="tidy memory")
        await stop.wait()
        tidying.cancel()
        log.info("stopping: completing open files")
    finally:
        await runner.cleanup()
    log.info("stopped")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard limit (logged), and return both.

    Each sensor may hold up to MAX_CHUNK_LINKTYPES pcapng files and a journal open, plus its
    connections; the usual soft limit of 1,024 would be reached by a few dozen sensors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return soft, hard
        log.info("open-files limit raised from %d to %d", soft, hard)
        return hard, hard
    log.info("open-files limit: %d", soft)
    return soft, hard


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    environ = dict(os.environ if environ is None else environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["antigena"]:  # the operator's client for a running vSensor
        from .antigena_cli import run_cli
        return run_cli(argv[1:], environ)
    if argv[:1] == ["store"]:  # a store worker of a cluster (cluster/store_worker.py)
        from .store_cli import run_store
        return run_store(argv[1:], environ)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or one line naming a bad option
        return exc.code if isinstance(exc.code, int) else 1
    keep_buffers_mapped()
    snapshots_on_signal(environ)  # diagnosis only (make soak --heap): off unless the variable
    try:
        # Bad input ends start-up before anything else is said: one line, the problem.
        settings, host, port, context = prepare(args, environ)
        raise_open_files_limit()  # before warn_about() warns about a limit below the cap
        warn_about(settings)
        asyncio.run(serve(settings, host, port, context))
    except (UsageError, ActionFileError) as exc:
        print(f"ossensor-vsensor: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
