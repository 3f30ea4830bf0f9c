"""A request captured before a restart cannot be replayed after it (issue 15, item 6): the
nonces seen within the window are kept in ``DATA_DIR/.nonces`` and loaded at start."""

from __future__ import annotations

import asyncio
import json

from ossensor_vsensor import nonces as nonce_journal
from ossensor_vsensor.nonces import NONCE_FILE, JournaledNonces

from ossensor_core.wire.names import PATH_REGISTER
from ossensor_core.wire.signing import sign
from tests.helpers.raw_tls import guarded
from tests.helpers.vsensor import KEY, SENSOR, make_chunk, running, settings


def run(coro):
    return asyncio.run(coro)


def test_a_request_replayed_after_a_restart_is_refused(tmp_path, tls):
    body = json.dumps({"sensor": SENSOR, "versions": [1], "addresses": ["192.0.2.10"]}).encode()
    captured = sign(KEY, "POST", PATH_REGISTER, body, SENSOR)

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.post(PATH_REGISTER, body, signed=captured))[0] == 200
            chunk_body = client.codec.encode(make_chunk(1))
            chunk_headers = {"X-Ossensor-Chunk-Sequence": "1"}
            chunk_signed = sign(KEY, "POST", "/api/v1/chunks", chunk_body, SENSOR)
            assert (await client.post("/api/v1/chunks", chunk_body, signed=chunk_signed,
                                      headers=chunk_headers))[:2] == (200, {"stored": 3})
        # A new vSensor on the same folder (a restart) ...
        async with running(settings(tmp_path), tls) as client:
            status, answer, _ = await client.post(PATH_REGISTER, body, signed=captured)
            assert (status, answer["error"]) == (401, "replay")
            status, answer, _ = await client.post("/api/v1/chunks", chunk_body,
                                                  signed=chunk_signed, headers=chunk_headers)
            assert (status, answer["error"]) == (401, "replay")
            # ... still takes new requests.
            assert (await client.register())[0] == 200
        # And a real process restart goes through the guarded site the CLI uses.
        async with guarded(settings(tmp_path), tls) as g:
            import aiohttp
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=g.client_ctx)) as session:
                async with session.post(g.base + PATH_REGISTER, data=body,
                                        headers={"X-Ossensor-Protocol": "1", **captured}) as r:
                    assert (r.status, (await r.json())["error"]) == (401, "replay")

    run(scenario())


def test_the_journal_keeps_only_the_window_and_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(nonce_journal, "COMPACT_AFTER", 100)
    path = tmp_path / NONCE_FILE
    journal = JournaledNonces(path, window_seconds=10, now=1000.0)
    for i in range(1000):
        assert journal.check_and_add(f"{i:032x}", 1000.0 + i * 0.1)
    assert not journal.check_and_add(f"{999:032x}", 1100.0)
    journal.close()
    lines = path.read_bytes().splitlines()
    # Only what is within twice the window (20 s = 200 nonces) survives a rewrite.
    assert len(lines) <= 2 * 201 + 1, len(lines)
    # Garbage lines (a torn write, a hostile edit) are skipped, not fatal.
    with open(path, "ab") as out:
        out.write(b"\xff\xfe garbage\nnot-a-number " + b"x" * 32 + b"\n" + b"9" * 5000 + b"\n")
    again = JournaledNonces(path, window_seconds=10, now=1100.0)
    assert not again.check_and_add(f"{999:032x}", 1100.0)  # still known after a restart
    assert again.check_and_add(f"{5:032x}", 1100.0)  # seen at 1000.5: out of the window
    again.close()
