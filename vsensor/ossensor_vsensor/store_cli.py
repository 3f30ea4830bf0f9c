"""``ossensor-vsensor store``: run a store worker of a cluster (``cluster/store_worker.py``).

It needs no key and listens on no port: it reads the chunk stream from NATS and writes
``DATA_DIR/<sensor>/*.pcapng`` as single mode does, with the same rotation and retention
options. ``--worker`` names it in the cluster (default: the host name, which is the pod name
of a StatefulSet): a worker started again under its name takes its partitions back at once, so
give each worker a name of its own and the same volume across restarts. SIGTERM and SIGINT
finish the batches in hand, complete the open files and exit 0; bad input exits 1 with one
line naming the option.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from collections.abc import Sequence

from ossensor_core.runtime.memory import keep_buffers_mapped, tidy_periodically
from ossensor_core.runtime.threads import named_executor

from .cli import (UsageError, _Parser, _path, add_file_options, add_stream_options, number,
                  raise_open_files_limit, shown)
from .cluster.connection import ClusterSettings
from .cluster.store_worker import StoreWorker, StoreWorkerSettings

log = logging.getLogger("ossensor_vsensor")

#: A worker's name is part of a key (``worker.<name>``): what a pod or host name may hold.
WORKER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ossensor-vsensor store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", required=True, metavar="URL[,URL...]",
                        help="NATS servers (nats:// or tls://) of the cluster")
    parser.add_argument("--data-dir", required=True, type=_path, metavar="DIR",
                        help="where DIR/<sensor>/*.pcapng and their journals go (a volume "
                             "kept across restarts)")
    parser.add_argument("--worker", metavar="NAME",
                        help="this worker's name in the cluster (default: the host name)")
    add_stream_options(parser, "used when this worker makes the stream; the replicas set it "
                               "on an existing one")
    add_file_options(parser, "on this volume")
    parser.add_argument("--lease-seconds", type=number(float, 1, 3600), default=30.0,
                        metavar="N",
                        help="how long a stopped worker's partitions wait before another "
                             "worker takes them (default 30)")
    return parser


def prepare(args: argparse.Namespace) -> StoreWorkerSettings:
    """The settings, every value checked; UsageError naming the option otherwise."""
    if args.worker is not None and not WORKER_NAME.fullmatch(args.worker):
        raise UsageError(f"--worker {shown(args.worker)}: 1-128 characters from "
                         "A-Za-z0-9._-, not starting with a dot")
    try:
        data_dir = args.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--data-dir {shown(args.data_dir)}: cannot create it "
                         f"({exc.strerror or exc})") from None
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {shown(data_dir)}: is not a folder")
    try:
        import nats  # noqa: F401
    except ImportError:
        raise UsageError("store needs the nats-py package: pip install "
                         "'ossensor-vsensor[cluster]'") from None
    try:
        cluster = ClusterSettings(tuple(args.nats.split(",")), replicas=args.nats_replicas,
                                  stream_max_bytes=args.nats_stream_max_bytes,
                                  **({"name": args.worker} if args.worker else {}))
        if not WORKER_NAME.fullmatch(cluster.name):
            raise ValueError(f"the host name {shown(cluster.name)} cannot name a worker: "
                             "pass --worker")
        return StoreWorkerSettings(
            data_dir=data_dir, cluster=cluster, rotate_bytes=args.rotate_bytes,
            rotate_seconds=args.rotate_seconds, retain_seconds=args.retain_seconds,
            retain_bytes=args.retain_bytes, lease_seconds=args.lease_seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def serve(settings: StoreWorkerSettings) -> None:
    # As the vSensor's (cli.py): every thread of the pool started now, none later.
    asyncio.get_running_loop().set_default_executor(named_executor("store", start_all=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tidying = asyncio.create_task(tidy_periodically(), name="tidy memory")
    try:
        await StoreWorker(settings).run(stop)
    finally:
        tidying.cancel()


def run_store(argv: Sequence[str], environ: dict[str, str]) -> int:
    """``ossensor-vsensor store ...``; the exit code."""
    del environ  # nothing secret is read: NATS credentials go in the URL for now
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # --help, or one line naming a bad option
        return exc.code if isinstance(exc.code, int) else 1
    keep_buffers_mapped()
    try:
        settings = prepare(args)
        raise_open_files_limit()
        asyncio.run(serve(settings))
    except UsageError as exc:
        print(f"ossensor-vsensor store: error: {exc}", file=sys.stderr)
        return 1
    return 0
