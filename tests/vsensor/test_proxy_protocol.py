"""Behind a TCP load balancer: the PROXY header (vsensor/ossensor_vsensor/proxy_protocol.py) and
per-address caps that count sensors, not the balancer (server.py, ``proxy_protocol_from``)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import struct

import pytest
from hypothesis import given, settings as hypothesis_settings
from hypothesis import strategies as st

from ossensor_vsensor.app import VSENSOR
from ossensor_vsensor.proxy_protocol import MAX_V2_BYTES, V2_SIGNATURE, parse
from tests.helpers.haproxy import haproxy, needs_haproxy
from tests.helpers.raw_tls import guarded, request_head, response
from tests.helpers.vsensor import settings
from tests.helpers.vsensor_process import free_port

REFUSED = (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)


def v2(source: str, command: int = 1, tlvs: bytes = b"") -> bytes:
    ip = ipaddress.ip_address(source)
    family = 0x11 if ip.version == 4 else 0x21
    body = ip.packed + ip.packed + struct.pack("!HH", 40000, 443) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_headers_of_both_versions_give_the_client_address():
    hello = b"\x16\x03\x01\x02\x00"  # what follows: the TLS ClientHello, not consumed
    header = v2("198.51.100.7", tlvs=b"\x01\x00\x02h2")
    assert parse(header + hello) == (len(header), "198.51.100.7", ("198.51.100.7", 443))
    header6 = v2("2001:db8::7")
    assert parse(header6) == (len(header6), "2001:db8::7", ("2001:db8::7", 443))
    assert parse(v2("198.51.100.7", command=0)) == (28, None, None)  # LOCAL: a health check
    line = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n"
    assert parse(line + hello) == (len(line), "198.51.100.7", ("192.0.2.1", 443))
    assert parse(b"PROXY UNKNOWN\r\n") == (15, None, None)
    for whole in (header, line):  # every prefix is "not yet", never a wrong answer
        assert all(parse(whole[:n]) is None for n in range(1, len(whole)))


@pytest.mark.parametrize("data, culprit", [
    (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),
    (b"PROXY TCP4 198.51.100.7 192.0.2.1 40000\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n", "bad address or port"),
    (b"PROXY TCP4 198.51.100.7 192.0.2.1 1 70000\r\n", "bad address or port"),
    (b"PROXY " + b"9" * 120, "longer than 107 bytes"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "of version 1"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "address family 1 with 4 address bytes"),
])
def test_what_is_not_a_proxy_header_is_refused_naming_why(data, culprit):
    with pytest.raises(ValueError, match=culprit):
        parse(data)


@hypothesis_settings(max_examples=500)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=250).map(lambda b: V2_SIGNATURE + b),
                 st.binary(max_size=120).map(lambda b: b"PROXY " + b)))
def test_any_bytes_give_a_header_within_them_not_yet_or_a_value_error(data):
    try:
        result = parse(data)
    except ValueError as exc:
        assert len(str(exc)) < 300
        return
    if result is not None:
        length, address, front = result
        assert 0 < length <= min(len(data), MAX_V2_BYTES)
        assert address is None or ipaddress.ip_address(address)
        assert front is None or (ipaddress.ip_address(front[0]) and 0 <= front[1] <= 65535)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def open_through(port: int, client_ctx: ssl.SSLContext, source: str):
    return await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                         server_hostname="127.0.0.1", local_addr=(source, 0))


@needs_haproxy
@pytest.mark.parametrize("proxied", [True, False])
def test_behind_haproxy_each_sensor_is_capped_by_its_own_address(tmp_path, tls, proxied,
                                                                  caplog):
    """Two connections per address: through HAProxy with PROXY v2, a third from 127.0.0.2 is
    refused while 127.0.0.3 still gets in; without it, all count as the balancer's address."""
    async def scenario():
        vsettings = settings(tmp_path, max_connections_per_address=2,
                             proxy_protocol_from=("127.0.0.1/32",) if proxied else ())
        async with guarded(vsettings, tls) as g:
            counts = g.app[VSENSOR].counts
            port = free_port()
            with haproxy(tmp_path / "lb", f"127.0.0.1:{port}", [f"127.0.0.1:{g.port}"],
                         proxy_v2=proxied):
                first = [await open_through(port, g.client_ctx, "127.0.0.2") for _ in range(2)]
                with pytest.raises(REFUSED):
                    await open_through(port, g.client_ctx, "127.0.0.2")
                if proxied:
                    other = await open_through(port, g.client_ctx, "127.0.0.3")
                    assert dict(counts.connections) == {"127.0.0.2": 2, "127.0.0.3": 1}
                    # The request is shown and counted under the sensor's own address.
                    reader, writer = other
                    writer.write(request_head("POST", "/api/v1/register", {}, 0))
                    status, _ = await response(reader)
                    assert status == 401
                    first.append(other)
                else:
                    with pytest.raises(REFUSED):
                        await open_through(port, g.client_ctx, "127.0.0.3")
                    assert dict(counts.connections) == {"127.0.0.1": 2}
                for _, writer in first:
                    writer.close()
                await asyncio.sleep(0.3)
                assert counts.total_connections == 0

    caplog.set_level(logging.INFO, "ossensor_vsensor")
    run(scenario())
    if proxied:
        lines = [r.getMessage() for r in caplog.records]
        assert any("127.0.0.3" in line and "refused" in line for line in lines), lines


def test_a_balancer_connection_without_a_header_is_closed_and_others_need_none(tmp_path, tls,
                                                                               caplog):
    async def scenario():
        vsettings = settings(tmp_path, proxy_protocol_from=("127.0.0.9/32",),
                             handshake_seconds=1.0)
        async with guarded(vsettings, tls) as g:
            with pytest.raises(REFUSED):  # the ClientHello is not a PROXY header
                await open_through(g.port, g.client_ctx, "127.0.0.9")
            reader, writer = await open_through(g.port, g.client_ctx, "127.0.0.2")
            writer.close()
            # A balancer that connects and says nothing is closed after the handshake time.
            raw_reader, raw_writer = await asyncio.open_connection(
                "127.0.0.1", g.port, local_addr=("127.0.0.9", 0))
            raw_writer.write(v2("198.51.100.7")[:10])
            try:
                assert await asyncio.wait_for(raw_reader.read(), 5) == b""
            except ConnectionResetError:  # closed with a reset: as good
                pass
            raw_writer.close()

    caplog.set_level(logging.WARNING, "ossensor_vsensor")
    run(scenario())
    lines = [r.getMessage() for r in caplog.records if "load balancer 127.0.0.9" in r.getMessage()]
    assert any("no PROXY protocol header" in line for line in lines), lines
    assert any("no whole PROXY header within 1 s" in line for line in lines), lines
