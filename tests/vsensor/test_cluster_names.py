"""Sensor names in NATS subjects and keys (vsensor/ossensor_vsensor/cluster/names.py)."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ossensor_vsensor.cluster.names import name, token


@given(st.text(min_size=1, max_size=200))
def test_every_name_has_one_token_that_nats_cannot_split_and_that_reads_back(sensor):
    text = token(sensor)
    assert re.fullmatch(r"s[a-z2-7]*", text)  # no ".", " ", "*", ">" or "=": one token
    assert name(text) == sensor


def test_names_that_differ_only_in_dots_and_spaces_get_different_tokens():
    names = ["node.a", "node a", "node_a", "node-a", "node.a.", "Node.a", "node>a", "node*"]
    assert len({token(n) for n in names}) == len(names)


@pytest.mark.parametrize("text", ["", "x", "s!", "s" + "1" * 8, "sé", "saaa", "sab"])
def test_what_is_not_a_token_is_refused(text):
    with pytest.raises(ValueError, match="not a sensor token"):
        name(text)
