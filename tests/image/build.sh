#!/usr/bin/env bash
# Builds the ossensor image with podman on a Debian base made here (no image registry is
# reachable): debootstrap --variant=minbase bookworm, imported with `podman import`. The base is
# kept between runs (localhost/ossensor-base:bookworm); the image is tagged IMAGE (argument 1).
# Needs root, podman and debootstrap (tests/image/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE="${1:-localhost/ossensor:test}"
BASE_IMAGE="localhost/ossensor-base:bookworm"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/tests/image/containers.conf}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if ! podman image exists "$BASE_IMAGE"; then
    rootfs="$(mktemp -d /var/tmp/ossensor-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # The archive's security updates, as in the official images.
    echo "deb $MIRROR-security bookworm-security main" >"$rootfs/etc/apt/sources.list.d/security.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null
fi

secret=()
if [ -s "$CA_BUNDLE" ]; then
    secret=(--secret "id=ca-bundle,src=$CA_BUNDLE")
fi
podman build --quiet --format docker --network host --build-arg "BASE=$BASE_IMAGE" "${secret[@]}" \
    -t "$IMAGE" -f Dockerfile . >/dev/null
echo "$IMAGE"
