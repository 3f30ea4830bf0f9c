"""Interface patterns behave exactly like GNU ``grep -E``: a differential test on generated input."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from ossensor_core.node.patterns import ExtendedRegex, PatternError

ATOMS = ["eth", "veth", "e", "t", "h", "0", "1", "7", ".", "[[:digit:]]", "[[:alpha:]]",
         "[[:alnum:]]", "[[:lower:]]", "[^0-9]", "[a-f]", "[0-3]", "[.]", "[-_]", "\\.", "br",
         "cali", "tap", "-", "_", "x", "[[:punct:]]", "[]a]", "[^]a]", "\\w", "\\<"]
NAMES = ["eth0", "eth1", "eth7", "eth10", "veth0", "veth1a2b", "vethab.12", "br0", "br-1f2e",
         "docker0", "cali1234abcd", "tap0", "tun0", "ens3", "enp0s31f6", "wlan0", "lo",
         "flannel.1", "cni0", "kube-ipvs0", "wg0", "e", "eth", "x_1", "bond0.100", "eth0.7",
         "ETH0", "a]b", "eth-7"]


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.15 and depth < 2:
            inner = "|".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3)))
            atom = f"({inner})"
        else:
            atom = rng.choice(ATOMS)
        quantifier = rng.choice(["", "", "", "*", "+", "?", "{2}", "{1,2}", "{,1}", "{0,}"])
        if atom == "\\<":
            # A repeated zero-width anchor (\<*) is the one construct where grep's DFA and the
            # C library's matcher part ways; nobody writes it in an interface list.
            quantifier = ""
        parts.append(atom + quantifier)
    pattern = "".join(parts)
    if rng.random() < 0.3:
        pattern = "^" + pattern
    if rng.random() < 0.3:
        pattern += "$"
    return pattern


def grep_matches(pattern: str, names: list[str]) -> set[str] | None:
    """What grep -E selects, or None when grep refuses the pattern."""
    done = subprocess.run(["grep", "-E", "--", pattern], input="\n".join(names) + "\n",
                          capture_output=True, text=True, env={"LC_ALL": "C"}, timeout=10)
    if done.returncode == 2:
        return None
    return set(done.stdout.split("\n")) - {""}


@pytest.mark.skipif(shutil.which("grep") is None, reason="needs GNU grep")
def test_matches_grep_on_generated_patterns():
    rng = random.Random(20261127)
    patterns = {random_pattern(rng) for _ in range(400)}
    patterns |= {"^eth", "^veth", "eth7", "[[:digit:]]$", "^(eth|br)[0-9]+$", "^cali", "\\.",
                 "a{,2}", "x{1", "*eth", "eth**", "(", "[", "a{2,1}", "[b-a]", ")", "\\", "a|*"}
    disagreements = []
    for pattern in sorted(patterns):
        expected = grep_matches(pattern, NAMES)
        try:
            regex = ExtendedRegex(pattern)
        except PatternError:
            if expected is not None:
                disagreements.append((pattern, "we refuse, grep accepts"))
            continue
        if expected is None:
            disagreements.append((pattern, "we accept, grep refuses"))
            continue
        got = {name for name in NAMES if regex.search(name)}
        if got != expected:
            disagreements.append((pattern, sorted(got ^ expected)))
    assert disagreements == []


def test_bracket_classes_are_posix_not_python():
    assert ExtendedRegex("^eth[[:digit:]]$").search("eth7")
    assert not ExtendedRegex("^eth[[:digit:]]$").search("eth:")  # Python's re would match ':'
    assert ExtendedRegex("[\\]").search("a\\b")  # a backslash is literal inside brackets


def test_error_names_the_pattern():
    with pytest.raises(PatternError) as info:
        ExtendedRegex("eth[")
    assert info.value.pattern == "eth["
    assert "eth[" in str(info.value)
