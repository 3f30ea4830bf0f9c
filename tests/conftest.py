from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.netns import Namespace, have_netns, namespaces


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
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OSSENSOR_", "VSENSOR_", "NETWORK_DEVICE_", "ANTIGENA_"))
           and k != "BPF"}
    env.update({
        "VSENSOR_HOSTNAME": "vsensor.test",
        "VSENSOR_HMAC_KEY": "Kx9secretHMACkey42",
        "OSSENSOR_CONFIG_PATH": str(tmp_path / "etc" / "ossensor.cfg"),
        "OSSENSOR_TRANSPORT": "file",
        "OSSENSOR_OUTPUT_DIR": str(tmp_path / "out"),
    })
    return env
