"""Request signing and verification, shared by the sensor and the vSensor."""

from __future__ import annotations

import pytest

from ossensor_core.wire.signing import (AuthError, NonceCache, negotiate, sign, verify)

KEY = "Kx9secretHMACkey42"


def signed(body=b"payload", now=1_000_000.0, key=KEY):
    return sign(key, "POST", "/api/v1/chunks", body, "node-1", now=now)


def test_good_request_verifies_with_any_rotated_key():
    headers = signed()
    result = verify(["oldKey0000", KEY], "POST", "/api/v1/chunks", headers, b"payload",
                    NonceCache(300), now=1_000_010.0)
    assert (result.sensor, result.key_index) == ("node-1", 1)


@pytest.mark.parametrize("tamper, reason", [
    (lambda h, b: (dict(h, **{"X-Ossensor-Sensor": "node-2"}), b), "signature"),
    (lambda h, b: (h, b + b"x"), "body does not match"),
    (lambda h, b: (dict(h, Authorization=h["Authorization"][:-2] + "00"), b), "signature"),
    (lambda h, b: ({k: v for k, v in h.items() if k != "X-Ossensor-Nonce"}, b), "missing header"),
])
def test_tampering_is_rejected(tamper, reason):
    headers, body = tamper(signed(), b"payload")
    with pytest.raises(AuthError, match=reason) as info:
        verify([KEY], "POST", "/api/v1/chunks", headers, body, NonceCache(300), now=1_000_000.0)
    assert KEY not in str(info.value)


def test_wrong_key_path_and_method():
    for method, path, keys in (("POST", "/api/v1/chunks", ["another-key"]),
                               ("POST", "/api/v1/register", [KEY]),
                               ("PUT", "/api/v1/chunks", [KEY])):
        with pytest.raises(AuthError, match="signature"):
            verify(keys, method, path, signed(), b"payload", NonceCache(300), now=1_000_000.0)


def test_clock_skew_and_replay():
    with pytest.raises(AuthError, match="outside the 300 s window"):
        verify([KEY], "POST", "/api/v1/chunks", signed(), b"payload", NonceCache(300),
               now=1_000_301.0)
    nonces = NonceCache(300)
    headers = signed()
    verify([KEY], "POST", "/api/v1/chunks", headers, b"payload", nonces, now=1_000_000.0)
    with pytest.raises(AuthError, match="replay"):
        verify([KEY], "POST", "/api/v1/chunks", headers, b"payload", nonces, now=1_000_001.0)


def test_version_negotiation():
    assert negotiate([1, 2]) == 1
    assert negotiate([2, 3]) is None


def test_blake3_body_digest_verifies_and_is_bound_to_the_signature():
    from ossensor_core.wire.signing import BLAKE3, H_CONTENT, H_CONTENT_BLAKE3, content_digest
    body = bytes(range(256)) * 4096
    headers = sign(KEY, "POST", "/api/v1/chunks", body, "node-1", now=1_000_000.0,
                   algorithm=BLAKE3)
    assert H_CONTENT not in headers
    assert headers[H_CONTENT_BLAKE3] == content_digest(body, BLAKE3)
    assert verify([KEY], "POST", "/api/v1/chunks", headers, body, NonceCache(300),
                  now=1_000_000.0).sensor == "node-1"
    with pytest.raises(AuthError, match="body does not match"):
        verify([KEY], "POST", "/api/v1/chunks", headers, body[:-1] + b"x", NonceCache(300),
               now=1_000_000.0)
    # The signature names the algorithm: the same hex relabelled as SHA-256 does not verify.
    relabelled = {k: v for k, v in headers.items() if k != H_CONTENT_BLAKE3}
    relabelled[H_CONTENT] = headers[H_CONTENT_BLAKE3]
    with pytest.raises(AuthError):
        verify([KEY], "POST", "/api/v1/chunks", relabelled, body, NonceCache(300),
               now=1_000_000.0)
    both = dict(headers, **{H_CONTENT: content_digest(body)})
    with pytest.raises(AuthError, match="two body digest headers"):
        verify([KEY], "POST", "/api/v1/chunks", both, body, NonceCache(300), now=1_000_000.0)
