"""TLS for the vSensor: a given certificate, or a self-signed one made on first start.

The self-signed certificate and its key live in ``DATA_DIR/.tls/`` (the key file mode 0600) and
are reused on later starts, so sensors can pin its SHA-256 fingerprint, which is logged.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

TLS_DIR = ".tls"
CERT_NAME = "vsensor-cert.pem"
KEY_NAME = "vsensor-key.pem"
VALID_DAYS = 3650


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of the DER certificate as colon-separated upper-case hex (as openssl shows it)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(cert_der)
    return ":".join(f"{b:02X}" for b in digest.finalize())


def certificate_fingerprint(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def certificate_names(host: str, advertised: str | None = None) -> list[str]:
    """What the self-signed certificate names: the listen address (unless a wildcard such as
    ``0.0.0.0``, which no client can use), the advertised address, this machine's host name
    and fully qualified name, and the loopback names."""
    names = [host, advertised or "", socket.gethostname(), socket.getfqdn(), "localhost",
             "127.0.0.1", "::1"]
    return [n for n in dict.fromkeys(names) if n and n not in ("0.0.0.0", "::")]


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for value in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            try:
                entries.append(x509.DNSName(value.encode("idna").decode("ascii")))
            except (UnicodeError, ValueError):
                log.warning("the self-signed certificate cannot name %r: not a DNS name", value)
    return entries


def ensure_self_signed(data_dir: Path, host: str,
                       advertised: str | None = None) -> tuple[Path, Path, bool]:
    """(certificate file, key file, created) in ``data_dir/.tls``; made when missing, naming
    :func:`certificate_names` (an existing one is kept: sensors may pin its fingerprint)."""
    directory = Path(data_dir) / TLS_DIR
    cert_file, key_file = directory / CERT_NAME, directory / KEY_NAME
    if cert_file.exists() and key_file.exists():
        return cert_file, key_file, False
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ossensor vSensor"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ossensor")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(
                _san_entries(certificate_names(host, advertised))), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # The key file is created 0600 from the start, never world-readable for a moment.
    tmp_key = key_file.with_name(key_file.name + ".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key_file)
    tmp_cert = cert_file.with_name(cert_file.name + ".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_file)
    return cert_file, key_file, True


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.2 or later, as the protocol requires."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context
