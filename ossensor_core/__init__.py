"""ossensor core: configuration, hook specifications, plugin loading, batches and chunks.

The core imports no plugin. Plugins are found through entry points (see ``docs/architecture.md``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ossensor")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
