"""``ossensor-vsensor``: start-up checks, the self-signed certificate, clean shutdown."""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import urllib.request

import pytest

from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.wire.signing import PATH_CHUNKS, PATH_REGISTER, sign
from ossensor_vsensor.cli import main, parse_listen, UsageError
from tests.helpers.vsensor import KEY, SENSOR, make_chunk, stored_files
from tests.helpers.vsensor_process import free_port, start_local


def start(tmp_path, port, log_name):
    return start_local(tmp_path, port, log_name,
                       env={"VSENSOR_HMAC_KEY": f"old-key-0001, {KEY}"})


def post(port, context, path, body, headers=None):
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}", data=body, method="POST",
        headers={**sign(KEY, "POST", path, body, SENSOR), "X-Ossensor-Protocol": "1",
                 **(headers or {})})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read())


def test_cli_serves_with_a_self_signed_certificate_and_stops_cleanly(tmp_path):
    port = free_port()
    process = start(tmp_path, port, "first.log")
    try:
        pem = ssl.get_server_certificate(("127.0.0.1", port))
        served = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
        logged = (tmp_path / "first.log").read_text().split("fingerprint: ")[1].split()[0]
        assert logged.replace(":", "") == served
        key_file = tmp_path / "data" / ".tls" / "vsensor-key.pem"
        assert key_file.stat().st_mode & 0o777 == 0o600

        # The certificate verifies for 127.0.0.1 once trusted (what a sensor pinning it does).
        context = ssl.create_default_context(cafile=str(tmp_path / "data" / ".tls" /
                                                        "vsensor-cert.pem"))
        body = json.dumps({"sensor": SENSOR, "versions": [1], "addresses": []}).encode()
        assert post(port, context, PATH_REGISTER, body)["version"] == 1
        body = ChunkCodec().encode(make_chunk(1))
        assert post(port, context, PATH_CHUNKS, body,
                    {"X-Ossensor-Chunk-Sequence": "1"}) == {"stored": 3}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    (stored,) = stored_files(tmp_path / "data")
    assert stored.suffix == ".pcapng"  # the .part was completed on SIGTERM
    log = (tmp_path / "first.log").read_text()
    assert KEY not in log and "old-key-0001" not in log

    # A second start reuses the certificate.
    process = start(tmp_path, port, "second.log")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 0
    assert f"fingerprint: {logged}" in (tmp_path / "second.log").read_text()


@pytest.mark.parametrize("argv, environ, option", [
    (["--listen", "127.0.0.1:0"], {"VSENSOR_HMAC_KEY": "k"}, "--listen"),
    (["--listen", "nonsense"], {"VSENSOR_HMAC_KEY": "k"}, "--listen"),
    (["--listen", "[not-ipv6]:8443"], {"VSENSOR_HMAC_KEY": "k"}, "--listen"),
    (["--listen", "127.0.0.1:8443"], {}, "VSENSOR_HMAC_KEY"),
    (["--listen", "127.0.0.1:8443", "--hmac-key-file", "/nonexistent/keys"],
     {"VSENSOR_HMAC_KEY": "Kx9secretHMACkey42"}, "--hmac-key-file"),
    (["--listen", "127.0.0.1:8443", "--retain-seconds", "0"], {"VSENSOR_HMAC_KEY": "k"},
     "--retain-seconds"),
    (["--listen", "127.0.0.1:8443", "--retain-bytes", "-5"], {"VSENSOR_HMAC_KEY": "k"},
     "--retain-bytes"),
])
def test_bad_input_exits_1_naming_the_option(tmp_path, capsys, argv, environ, option):
    assert main(argv + ["--data-dir", str(tmp_path / "d")], environ) == 1
    err = capsys.readouterr().err
    assert option in err and KEY not in err


def test_key_file_that_is_a_folder_and_keys_from_files(tmp_path, capsys):
    assert main(["--listen", "127.0.0.1:8443", "--data-dir", str(tmp_path / "d"),
                 "--hmac-key-file", str(tmp_path)], {}) == 1
    assert "--hmac-key-file" in capsys.readouterr().err
    from ossensor_vsensor.cli import load_keys
    (tmp_path / "keys").write_text("one\n\n two \n")
    assert load_keys({"VSENSOR_HMAC_KEY": "a,b c"}, [tmp_path / "keys"]) == \
        ["a", "b", "c", "one", "two"]


def test_listen_addresses():
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen("0.0.0.0:443") == ("0.0.0.0", 443)
    assert parse_listen("vsensor.example:8443") == ("vsensor.example", 8443)
    with pytest.raises(UsageError, match="--listen"):
        parse_listen("::1:8443")


def test_retention_options_reach_the_settings(tmp_path):
    from ossensor_vsensor.cli import build_parser, prepare
    args = build_parser().parse_args(["--listen", "127.0.0.1:8443", "--data-dir",
                                      str(tmp_path / "d"), "--retain-seconds", "86400",
                                      "--retain-bytes", "1000000"])
    vsettings = prepare(args, {"VSENSOR_HMAC_KEY": "k"})[0]
    assert (vsettings.retain_seconds, vsettings.retain_bytes) == (86400.0, 1000000)
    args = build_parser().parse_args(["--listen", "127.0.0.1:8443", "--data-dir",
                                      str(tmp_path / "d")])
    vsettings = prepare(args, {"VSENSOR_HMAC_KEY": "k"})[0]
    assert (vsettings.retain_seconds, vsettings.retain_bytes) == (None, None)


@pytest.mark.parametrize("argv, message", [
    (["--nats", "nats://127.0.0.1:4222"], "--nats needs --tls-cert"),
    (["--nats", "http://127.0.0.1:4222", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
     "not a nats:// or tls:// URL"),
    (["--nats", " , ", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
     "--nats needs at least one server URL"),
    (["--replica", "replica-a"], "--replica needs --nats"),
])
def test_cluster_options_are_refused_naming_the_option(tmp_path, capsys, argv, message):
    """Refused before anything listens or connects (the certificate files here do not even
    exist: the cluster options are checked first)."""
    assert main(["--listen", "127.0.0.1:8443", "--data-dir", str(tmp_path / "d"), *argv],
                {"VSENSOR_HMAC_KEY": KEY}) == 1
    err = capsys.readouterr().err
    assert message in err and KEY not in err
