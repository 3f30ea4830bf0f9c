"""Scraping a sensor's Prometheus endpoint from inside its namespace."""

from __future__ import annotations

import sys
import time

from tests.helpers.netns import Namespace

METRICS = "127.0.0.1:9853"


SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode())
"""


def scrape(ns: Namespace) -> dict[str, float]:
    """Sample name with labels -> value, scraped from inside ``ns``."""
    text = ns.exec(sys.executable, "-c", SCRAPE, METRICS).stdout
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)

