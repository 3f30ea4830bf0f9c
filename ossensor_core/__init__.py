"""ossensor core: the pipeline and its loading, capture and filters, the node, wire formats,
operations. Plugin authors import :mod:`ossensor_core.plugin` only.

    pipeline/   configuration, plugin loading, start-up, the run loop, the contracts
    capture/    packet batches, BPF compilation, the generated peer exclusion
    node/       interfaces and their selection, routes and workloads
    wire/       what both ends share: chunk format, pcapng, request signing, Antigena messages
    ops/        the command line, diagnose, health, metrics, logging, threads, memory

The core imports no plugin. Plugins are found through entry points (see ``docs/architecture.md``).
"""

from importlib.metadata import PackageNotFoundError, version

from ossensor_core._moved import install as _answer_old_module_names

try:
    __version__ = version("ossensor")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_answer_old_module_names()
