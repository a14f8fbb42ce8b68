#!/usr/bin/env bash
# A small local base image for building docker/Dockerfile without a registry: a minimal Debian
# (debootstrap) with python3, pip and setuptools, imported into podman. Needs root, debootstrap,
# podman and runc (Debian packages) and a Debian mirror.
#
#   bash docker/ci/make-base-image.sh [TAG]      # default localhost/tokenselect-testbase:bookworm
set -euo pipefail
tag=${1:-localhost/tokenselect-testbase:bookworm}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,python3-setuptools \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$tag"
echo "base image: $tag"
