from tests.vsensor.helpers import tls  # noqa: F401  (the TLS fixture)
