"""The vSensor protocol client: what every part of the sensor that talks to the vSensor shares.

The https transport, Antigena and ``ossensor diagnose`` use it, so that TLS set-up
(:mod:`.tls`), identity and registration (:mod:`.identity`) and request signing (:mod:`.request`)
are written once. Header names and paths are in :mod:`ossensor_core.wire.names`.
"""

from __future__ import annotations

from ossensor_core.client.identity import (FEATURES, INSTANCE_FILE, load_instance, new_instance,
                                           read_instance, registration_body,
                                           routable_addresses)
from ossensor_core.client.request import base_url, signed_headers
from ossensor_core.client.tls import (ENV_CA_FILE, ENV_FINGERPRINT, ENV_TLS_VERIFY,
                                      SETTINGS_GROUP, AiohttpTls, VSensorTls, client_context,
                                      connection_settings, normalise_fingerprint, tls_setting)

__all__ = [
    "ENV_CA_FILE", "ENV_FINGERPRINT", "ENV_TLS_VERIFY", "FEATURES", "INSTANCE_FILE",
    "SETTINGS_GROUP", "AiohttpTls", "VSensorTls", "base_url", "client_context",
    "connection_settings", "load_instance", "new_instance", "normalise_fingerprint",
    "read_instance", "registration_body", "routable_addresses", "signed_headers", "tls_setting",
]
