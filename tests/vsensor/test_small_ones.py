"""Issue 15, item 7: page headers, start-up warnings, the self-signed certificate's names."""

from __future__ import annotations

import asyncio
import logging
import socket

from cryptography import x509
from ossensor_vsensor.cli import warn_about
from ossensor_vsensor.tls import ensure_self_signed

from tests.helpers.vsensor import KEY, running, settings


def test_status_pages_carry_csp_and_nosniff(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            found = {}
            for path in ("/status", "/status.json", "/metrics"):
                async with client.session.get(client.base + path) as r:
                    assert r.status == 200
                    found[path] = r.headers
            return found

    for path, headers in asyncio.run(scenario()).items():
        assert "default-src 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path


def test_warnings_at_start_for_open_pages_and_short_secrets(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    warn_about(settings(tmp_path, keys=[KEY, "short"], max_connections=100))
    text = caplog.text
    assert "status pages" in text and "VSENSOR_ADMIN_TOKEN" in text
    assert "HMAC key number 2 is shorter than 16 characters" in text
    assert KEY not in text and "short" not in text.replace("shorter", "")
    caplog.clear()
    warn_about(settings(tmp_path, keys=["k" * 16], admin_token="tiny", max_connections=100))
    assert "VSENSOR_ADMIN_TOKEN is shorter than 16" in caplog.text
    assert "status pages" not in caplog.text and "tiny" not in caplog.text
    caplog.clear()
    warn_about(settings(tmp_path, keys=["k" * 16], admin_token="t" * 16, max_connections=100))
    assert caplog.text == ""


def test_the_self_signed_certificate_names_the_host_and_the_advertised_address(tmp_path):
    cert_file, _, created = ensure_self_signed(tmp_path, "0.0.0.0", "vsensor.example.net")
    assert created
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"vsensor.example.net", socket.gethostname(), "localhost"} <= dns
    assert {"127.0.0.1", "::1"} <= ips and "0.0.0.0" not in ips
    cert_file, _, created = ensure_self_signed(tmp_path, "192.0.2.5", "198.51.100.7")
    assert not created  # kept: sensors may pin its fingerprint
