#!/usr/bin/env bash
# Installs what ossensor, its tests and its demo need on a fresh Debian machine (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 libpcap0.8 tcpdump tshark iputils-ping netsniff-ng tcpreplay iperf3 procps libcap2-bin chromium iptables)
missing=()
packages+=(socat)  # make bench's C-tools anchor: tcpdump -w - | socat - OPENSSL:...
packages+=(nats-server haproxy)  # the vSensor's cluster mode (JetStream) and its load balancer
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash scripts/install-k8s-tools.sh  # helm and kubectl for tests/deploy
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test,bench]' -e './vsensor[cluster]'
echo "setup: done (python $(python3 -c 'import sys; print(sys.version.split()[0])'), $(tcpdump --version 2>&1 | head -1))"
