"""One rule for sensor names at both ends (issue 15, item 4): the sensor refuses at start-up an
``OSSENSOR_NAME`` outside it, naming the variable; the vSensor's side is in
``tests/vsensor/test_names.py``."""

from __future__ import annotations

import subprocess

import pytest

from ossensor_core.pipeline.config import read_core_config
from ossensor_core.wire.names import valid_sensor_name
from tests.helpers.cli import COMMAND, sensor_environment

GOOD = ["node-1", "a_b", "ip-10-0-0-1.eu-west-1.compute.internal", "A", "x" * 253, "a.", "-a"]
BAD = ["", ".hidden", "..", "a/b", "a b", "a\\b", "nöde", "节点", "x" * 254, "a\nb", "a:b"]


@pytest.mark.parametrize("name", GOOD)
def test_names_within_the_rule(name):
    assert valid_sensor_name(name)
    config, problems = read_core_config({"OSSENSOR_NAME": name, "VSENSOR_HMAC_KEY": "k"})
    assert config.name == name
    assert not [p for p in problems if "OSSENSOR_NAME" in p]


@pytest.mark.parametrize("name", BAD)
def test_names_outside_the_rule_are_a_problem_naming_the_variable(name):
    assert not valid_sensor_name(name)
    if not name.strip():
        return  # an empty variable falls back to the host name
    _, problems = read_core_config({"OSSENSOR_NAME": name, "VSENSOR_HMAC_KEY": "k"})
    mine = [p for p in problems if "sensor name" in p]
    assert len(mine) == 1 and mine[0].startswith("OSSENSOR_NAME: ")
    assert "A-Za-z0-9._-" in mine[0]


@pytest.mark.parametrize("name", ["nöde", "节点"])
def test_the_sensor_refuses_to_start_with_one_line_naming_the_variable(tmp_path, name):
    """Was: ``nöde`` made every chunk fail with 500 forever; ``节点`` ended the uploader."""
    env = sensor_environment(tmp_path, OSSENSOR_NAME=name)
    result = subprocess.run([*COMMAND, "run"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "OSSENSOR_NAME" in line]
    assert len(lines) == 1, result.stderr
    assert "is not a sensor name" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
