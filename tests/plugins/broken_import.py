"""A plugin that fails on import, as a plugin with a missing dependency does."""

raise RuntimeError("simulated import failure: libfoo is missing")
