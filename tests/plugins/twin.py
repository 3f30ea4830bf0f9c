"""Two distributions register this module under the same name in the collision test."""

from ossensor_core.plugin import hookimpl


@hookimpl
def ossensor_startup(config):
    return None
