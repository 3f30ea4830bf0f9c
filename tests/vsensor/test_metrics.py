"""``/metrics`` keeps its series: names, label names, HELP and TYPE as recorded.

The files in ``data/`` were scraped from the vSensor before its metrics moved to
``prometheus_client``; dashboards and alerts depend on these names, so any change to them must
be deliberate (re-record with ``python -m tests.vsensor.test_metrics record``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

from ossensor_core.wire.signing import PATH_CHUNKS, PATH_HEARTBEAT
from tests.helpers.vsensor import make_chunk, running, settings

DATA = Path(__file__).parent / "data"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Exposition:
    """What a scrape says, without the formatting of its numbers."""

    def __init__(self, text: str) -> None:
        self.families: dict[str, dict[str, str]] = {}  # name -> {"help": ..., "type": ...}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                self.families.setdefault(name, {})["help"] = help_text
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                self.families.setdefault(name, {})["type"] = kind
            elif line and not line.startswith("#"):
                match = _SAMPLE.match(line)
                assert match, f"not a sample line: {line!r}"
                labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
                self.samples[(match["name"], labels)] = float(match["value"])

    def series(self) -> set[tuple[str, tuple[str, ...]]]:
        """(series name, sorted label names): the shape a query depends on."""
        return {(name, tuple(k for k, _ in labels)) for name, labels in self.samples}


async def _scrape(tmp_path: Path, tls, busy: bool) -> str:
    async with running(settings(tmp_path), tls) as client:
        if busy:
            assert (await client.register())[0] == 200
            for sequence in (1, 2, 2):  # stored, stored, duplicate
                assert (await client.send_chunk(make_chunk(sequence)))[0] == 200
            assert (await client.send_chunk(make_chunk(3), key="wrong-key"))[0] == 401
            assert (await client.send_chunk(make_chunk(4), headers_extra={
                "X-Ossensor-Test": "1"}))[0] == 200
            assert (await client.post(PATH_CHUNKS, b"garbage", headers={
                "X-Ossensor-Chunk-Sequence": "5"}))[0] == 400
            assert (await client.send_chunk(make_chunk(1, sensor="node-2")))[0] == 409
            beat = json.dumps({"interfaces": {"eth0": {"packets": 10, "drops": 2}}}).encode()
            assert (await client.post(PATH_HEARTBEAT, beat))[0] == 200
            assert (await client.get("/metrics"))[0] == 200  # counted in the next scrape
        status, text = await client.get("/metrics")
        assert status == 200
        return text


def _check(tmp_path: Path, tls, busy: bool, recorded: str) -> None:
    now = Exposition(asyncio.run(_scrape(tmp_path, tls, busy)))
    before = Exposition((DATA / recorded).read_text())
    assert now.families == before.families
    assert now.series() == before.series()
    assert not [name for name, _ in now.samples if name.endswith("_created")]
    # The labels and values too, but for the clock and the pcapng sizes (the section header
    # names the ossensor version).
    assert _steady(now) == _steady(before)


def _steady(scrape: Exposition) -> dict[tuple[str, tuple[tuple[str, str], ...]], float | None]:
    return {key: None if key[0].endswith(("_last_seen_seconds", "_bytes_stored_total"))
            else value for key, value in scrape.samples.items()}


def test_metrics_of_a_busy_vsensor_keep_their_names_and_labels(tmp_path, tls) -> None:
    _check(tmp_path, tls, True, "metrics-busy.txt")


def test_metrics_of_a_fresh_vsensor_keep_their_families(tmp_path, tls) -> None:
    _check(tmp_path, tls, False, "metrics-fresh.txt")


def _record() -> None:
    """Scrape both scenarios and write them to ``data/`` (run from the repository root)."""
    import tempfile

    from tests.helpers.vsensor import tls_contexts

    contexts = tls_contexts()
    DATA.mkdir(exist_ok=True)
    for busy, name in ((True, "metrics-busy.txt"), (False, "metrics-fresh.txt")):
        with tempfile.TemporaryDirectory() as folder:
            text = asyncio.run(_scrape(Path(folder), contexts, busy))
        (DATA / name).write_text(text)
        print(f"wrote {DATA / name}")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    _record()
