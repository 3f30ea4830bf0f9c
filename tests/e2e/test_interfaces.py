"""Interface selection on real interfaces, against the original's start-up script; hot-plug."""

from __future__ import annotations

import json
import queue
import random
import subprocess
import threading
import time

import pytest

from tests.helpers.cli import COMMAND, ossensor

# The original's start-up logic in shell: /proc/net/dev minus lo; each exclude pattern removes
# what grep -E matches; then, if an include list is given, keep what some include pattern matches.
ORIGINAL = r"""
set -f
devices=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | grep -v '^lo$')
for p in $EXCLUDE; do devices=$(printf '%s\n' $devices | grep -E -v -- "$p"); done
if [ -n "$INCLUDE" ]; then
  kept=""
  for p in $INCLUDE; do kept="$kept $(printf '%s\n' $devices | grep -E -- "$p")"; done
  devices=$kept
fi
printf '%s\n' $devices | sort -u
"""

# Real veth pairs, bridges and taps (the dummy link type is not available here).
VETH_PAIRS = [("eth0", "veth3a9f"), ("eth1", "vethab12"), ("eth10", "cali12ab34"),
              ("ens3", "flannel.1")]
BRIDGES = ["br0", "br-6f1e2d", "docker0", "cni0", "kube-br"]
TAPS = ["tap0", "tap-vm1", "wgx"]
PATTERN_WORDS = ["^eth", "^veth", "eth1", "[[:digit:]]$", "^(br|docker)", "^cali",
                 "\\.", "^tap[0-9]+$", "^[[:alpha:]]{3}[[:digit:]]", "-", "^k", "0$", "x",
                 "^e(th|ns)[0-9]{1,2}$", "^.{4}$"]


@pytest.fixture(scope="module")
def host(request):
    from tests.helpers.netns import have_netns, namespaces
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (ns,):
        for name, peer in VETH_PAIRS:
            ns.ip("link", "add", name, "type", "veth", "peer", "name", peer)
        for name in BRIDGES:
            ns.ip("link", "add", name, "type", "bridge")
        for name in TAPS:
            ns.ip("tuntap", "add", name, "mode", "tap")
        yield ns


def original_selection(ns, include: str, exclude: str) -> list[str]:
    done = ns.exec("sh", "-c", ORIGINAL,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
                        "INCLUDE": include, "EXCLUDE": exclude})
    return sorted(done.stdout.split())


def test_selection_matches_the_original_script(host, base_env):
    rng = random.Random(7)
    cases = [("", ""), ("^eth", ""), ("", "^veth"), ("^eth", "eth7"), ("^eth", "eth1"),
             ("[[:digit:]]$", "^veth ^cali")]
    for _ in range(8):
        include = " ".join(rng.sample(PATTERN_WORDS, rng.randint(0, 3)))
        exclude = " ".join(rng.sample(PATTERN_WORDS, rng.randint(0, 2)))
        cases.append((include, exclude))
    compared = 0
    for include, exclude in cases:
        expected = original_selection(host, include, exclude)
        env = dict(base_env, NETWORK_DEVICE_INCLUDELIST=include,
                   NETWORK_DEVICE_EXCLUDELIST=exclude)
        result = ossensor(["check"], env, host)
        if not expected:
            assert result.code == 1, (include, exclude, result.output)
            assert "check NETWORK_DEVICE_INCLUDELIST and NETWORK_DEVICE_EXCLUDELIST" in \
                result.stderr
            continue
        assert result.code == 0, (include, exclude, result.stderr)
        assert sorted(result.json()["interfaces"]) == expected, (include, exclude)
        compared += 1
    assert compared >= 6


class Watch:
    """``ossensor interfaces --watch`` in a namespace; events are timestamped as they arrive."""

    def __init__(self, ns, env, seconds: float) -> None:
        self.proc = subprocess.Popen([*ns.prefix(), *COMMAND, "interfaces", "--watch",
                                      str(seconds)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[float, dict]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), json.loads(line)))

    def wait_for(self, predicate, timeout: float) -> tuple[float, dict] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                arrived, item = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if predicate(item):
                return arrived, item
        return None

    def events(self, grace: float) -> list[dict]:
        time.sleep(grace)
        found = []
        while not self.lines.empty():
            found.append(self.lines.get()[1])
        return [e for e in found if "event" in e]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _is_event(kind: str, name: str):
    return lambda item: item.get("event") == kind and item.get("interface") == name


def test_hotplug_with_device_any(netns, base_env):
    netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "xpeer0")
    env = dict(base_env, NETWORK_DEVICE_ANY="1", NETWORK_DEVICE_INCLUDELIST="^eth ^cali",
               NETWORK_DEVICE_EXCLUDELIST="^calix")
    watch = Watch(netns, env, 20)
    try:
        assert watch.wait_for(lambda i: i.get("interface") == "xpeer0", 10), "no initial listing"
        time.sleep(0.5)  # let the netlink subscription start
        netns.ip("link", "add", "calix1", "type", "veth", "peer", "name", "xpeer1")  # excluded
        netns.ip("link", "add", "cali42", "type", "veth", "peer", "name", "xpeer2")
        created = time.monotonic()
        got = watch.wait_for(_is_event("added", "cali42"), 5)
        assert got, "an included interface added at run time was not reported"
        assert got[0] - created <= 1.0, f"reported after {got[0] - created:.3f} s"
        netns.ip("link", "set", "xpeer1", "name", "eth5")  # renamed into the include list
        assert watch.wait_for(_is_event("added", "eth5"), 2)
        netns.ip("link", "set", "cali42", "up")
        netns.ip("link", "del", "cali42")
        assert watch.wait_for(_is_event("removed", "cali42"), 2)
        others = watch.events(grace=1.0)
        names = {e["interface"] for e in others}
        assert "calix1" not in names and not any(n.startswith("xpeer") for n in names)
    finally:
        watch.stop()


def test_without_device_any_only_known_names_return(netns, base_env):
    netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth9")
    env = dict(base_env, NETWORK_DEVICE_ANY="0", NETWORK_DEVICE_INCLUDELIST="^eth")
    watch = Watch(netns, env, 20)
    try:
        assert watch.wait_for(lambda i: i.get("interface") == "eth9", 10)
        time.sleep(0.5)
        netns.ip("link", "add", "eth3", "type", "veth", "peer", "name", "peer3")  # new: ignored
        netns.ip("link", "set", "eth0", "up")
        netns.ip("link", "set", "eth0", "down")
        assert watch.wait_for(_is_event("down", "eth0"), 2)
        netns.ip("link", "del", "eth0")  # removes eth9 too
        assert watch.wait_for(_is_event("removed", "eth0"), 2)
        netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")  # comes back
        assert watch.wait_for(_is_event("added", "eth0"), 2), "a known interface that came " \
            "back was not picked up again"
        names = {e["interface"] for e in watch.events(grace=1.0)}
        assert "eth3" not in names
    finally:
        watch.stop()
