"""What strangers cost a real ``ossensor-vsensor`` process: the figures in ``docs/security.md``.

Starts the CLI on loopback (self-signed certificate, a throw-away data folder), then measures
from this process, reading the vSensor's ``/proc/<pid>/stat`` and ``VmRSS``:

* vSensor CPU per refused unsigned request, each on a new TLS connection;
* vSensor RSS during four parallel unsigned 64 MiB uploads;
* vSensor RSS per open TLS connection.

Run: ``python3 -m bench.strangers`` (from the repository root, packages installed).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UPLOAD = 64 << 20
HEAD = (b"POST /api/v1/chunks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % UPLOAD)


class VSensorProcess:
    def __init__(self, data_dir: Path, port: int) -> None:
        env = dict(os.environ, VSENSOR_HMAC_KEY="bench-key-0123456789abcdef",
                   VSENSOR_ADMIN_TOKEN="bench-token-0123456789")
        self.log = open(data_dir / "vsensor.log", "w")  # a pipe would fill and block it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ossensor_vsensor.cli", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(data_dir / "data")], env=env, stderr=self.log)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


async def measure(vsensor: VSensorProcess, port: int) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    async def refused(upload: bool = False) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(HEAD)
        if upload:
            block, sent = bytes(1 << 16), 0
            try:
                while sent < UPLOAD and not reader.at_eof():
                    writer.write(block)
                    sent += len(block)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except (ConnectionError, ssl.SSLError, asyncio.TimeoutError) as exc:
            line = type(exc).__name__.encode()
        writer.close()
        return line

    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    await refused()
    count, cpu, rss, wall = 500, vsensor.cpu_seconds(), vsensor.rss(), time.monotonic()
    for _ in range(count):
        await refused()
    print(f"refused unsigned requests, a new TLS connection each: {count}; vSensor CPU "
          f"{1e3 * (vsensor.cpu_seconds() - cpu) / count:.2f} ms each, wall "
          f"{1e3 * (time.monotonic() - wall) / count:.2f} ms each; RSS {rss >> 20} -> "
          f"{vsensor.rss() >> 20} MiB")
    before = peak = vsensor.rss()
    uploads = asyncio.gather(*(refused(upload=True) for _ in range(4)))
    while not uploads.done():
        peak = max(peak, vsensor.rss())
        await asyncio.sleep(0.005)
    answers = await uploads
    print(f"four unsigned 64 MiB uploads: {[a.strip().decode(errors='replace') for a in answers]}"
          f"; vSensor RSS {before >> 20} -> peak {peak >> 20} MiB")
    before = vsensor.rss()
    connections = [await asyncio.open_connection("127.0.0.1", port, ssl=context)
                   for _ in range(60)]
    await asyncio.sleep(0.5)
    print(f"60 open TLS connections: vSensor RSS +{(vsensor.rss() - before) / 60 / 1024:.0f} "
          f"KiB each")
    for _, writer in connections:
        writer.close()


def main() -> None:
    port = 20000 + os.getpid() % 20000
    with tempfile.TemporaryDirectory() as folder:
        vsensor = VSensorProcess(Path(folder), port)
        try:
            asyncio.run(measure(vsensor, port))
        finally:
            vsensor.stop()


if __name__ == "__main__":
    main()
