from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.cli import sensor_environment
from tests.helpers.netns import Namespace, have_netns, namespaces


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """One fresh network namespace (root only), removed afterwards."""
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (ns,):
        yield ns


@pytest.fixture
def netns_pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Two fresh network namespaces: (sender, receiver)."""
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(2) as (a, b):
        yield a, b


@pytest.fixture
def base_env(tmp_path) -> dict[str, str]:
    """A minimal valid sensor environment; the config file goes into tmp_path, never /etc."""
    return sensor_environment(tmp_path)


# Fixtures that create network namespaces; a test using one (or any end-to-end test) is marked
# ``netns``, so that ``-m "not netns"`` is the quick run that needs no root.
_NAMESPACE_FIXTURES = frozenset({"netns", "netns_pair", "kernel"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "e2e" in item.path.parts or _NAMESPACE_FIXTURES & set(
                getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)
