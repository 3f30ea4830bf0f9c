from tests.helpers.vsensor import tls  # noqa: F401  (the TLS fixture)
