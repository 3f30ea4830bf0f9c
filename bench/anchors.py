"""The C-tools anchor that does the sensor's whole job: ``tcpdump -w - | socat - OPENSSL:...``.

``tcpdump -w FILE`` only captures; the sensor captures *and* ships over TLS. This anchor does the
same job with C tools: tcpdump writes the capture to a pipe (stdio's buffering, as typed on a
command line), socat reads it and sends it over TLS, verifying the receiver's certificate against
a throwaway trustme CA. The receiver is a second socat, a TLS server on the capture namespace's
loopback that writes what arrives to a file, so that what was stored can be counted like the
sensor's. The anchor's CPU is that of both processes of the capturing side (tcpdump and the socat
client), as the sensor's is its own process; the receiver's is reported apart, like the
vSensor's.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.testbed import Capturer, Outcome, read, wait_for
from tests.helpers.daemonset import issue_certificate

RECEIVER_PORT = 8444
RECEIVER_ADDRESS = "127.0.0.1"


def receiver_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) for the receiver on loopback, made once per folder."""
    folder.mkdir(parents=True, exist_ok=True)
    files = tuple(folder / n for n in ("ca.pem", "cert.pem", "key.pem"))
    if not all(f.exists() for f in files):
        return issue_certificate(folder, RECEIVER_ADDRESS)
    return files  # type: ignore[return-value]


class TlsPipeCapturer(Capturer):
    """``tcpdump -B 131072 -w - | socat -u - OPENSSL:127.0.0.1:8444,cafile=CA`` on the bed's
    capture interface, into a ``socat OPENSSL-LISTEN`` receiver on the same namespace's
    loopback."""

    name = "tcpdump|socat"

    def __init__(self, bed: Any, workdir: Path) -> None:
        super().__init__(bed, workdir)
        self.client: subprocess.Popen | None = None
        self.receiver: subprocess.Popen | None = None

    def cpu_pids(self) -> list[int]:
        assert self.proc is not None and self.client is not None
        return [self.proc.pid, self.client.pid]

    def helper_pids(self) -> dict[str, int]:
        assert self.receiver is not None
        return {"receiver": self.receiver.pid}

    def start(self) -> None:
        ns = self.bed.rx
        ca, cert, key = receiver_certificate(self.bed.workdir / "socat-tls")
        self.out = self.workdir / "received.pcap"
        self.err = self.workdir / "tcpdump.err"
        self.receiver_log = self.workdir / "receiver.err"
        self.client_log = self.workdir / "client.err"
        self.receiver = ns.popen(
            "socat", "-u", f"OPENSSL-LISTEN:{RECEIVER_PORT},bind={RECEIVER_ADDRESS},reuseaddr,"
            f"cert={cert},key={key},verify=0", f"CREATE:{self.out}",
            stdout=subprocess.DEVNULL, stderr=open(self.receiver_log, "w"))
        wait_for(self._listening, 15, self.receiver, self.receiver_log)
        self.proc = ns.popen(
            "tcpdump", "-Z", "root", "-B", "131072", "-s", "262144", "-n", "-i", self.bed.rx_if,
            "-w", "-", stdout=subprocess.PIPE, stderr=open(self.err, "w"))
        assert self.proc.stdout is not None
        self.client = ns.popen(
            "socat", "-u", "-", f"OPENSSL:{RECEIVER_ADDRESS}:{RECEIVER_PORT},cafile={ca}",
            stdin=self.proc.stdout, stdout=subprocess.DEVNULL,
            stderr=open(self.client_log, "w"))
        self.proc.stdout.close()  # the client holds the pipe's reading end now
        wait_for(lambda: "listening on" in read(self.err), 15, self.proc, self.err)

    def _listening(self) -> bool:
        done = self.bed.rx.exec("ss", "-Hltn", f"sport = :{RECEIVER_PORT}", check=False)
        return str(RECEIVER_PORT) in done.stdout

    def stop(self) -> Outcome:
        assert self.proc is not None and self.client is not None and self.receiver is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        notes: dict[str, Any] = {"exit_code": self.client.wait(timeout=30)}
        deadline = time.monotonic() + 30
        while self.receiver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        notes["receiver_exit_code"] = self.receiver.poll()
        if notes["exit_code"] or notes["receiver_exit_code"]:
            raise RuntimeError(f"socat failed: client {read(self.client_log)[-1500:]}; "
                               f"receiver {read(self.receiver_log)[-1500:]}")
        match = re.search(r"(\d+) packets dropped by kernel", read(self.err))
        stored, counted = self.bed.stored_pcap(self.out)
        return Outcome(stored, int(match.group(1)) if match else -1, {**notes, **counted})

    def kill(self) -> None:
        super().kill()
        for process in (self.client, self.receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
