"""The reference vSensor: the server side of the protocol in ``docs/protocol.md``.

``ossensor_vsensor.app.create_app`` builds the aiohttp application; ``ossensor_vsensor.cli``
runs it over HTTPS. It shares only the protocol and chunk-format code with the sensor
(``ossensor_core.wire.signing``, ``ossensor_core.wire.chunk``, ``ossensor_core.wire.pcapng``).
"""

__version__ = "0.1.0"
