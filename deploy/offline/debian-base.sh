#!/usr/bin/env bash
# Makes a Debian bookworm base image with Python 3.11 on PATH, from Debian's
# own mirror (debootstrap + docker import), for machines that reach
# deb.debian.org but no container registry. The root-filesystem tarball is
# cached, so a second run only imports it.
#
#   deploy/offline/debian-base.sh [TAG]          # default TAG: pagedserve-base:bookworm
#   docker build -f deploy/Dockerfile.cpu --build-arg BASE=pagedserve-base:bookworm ...
set -euo pipefail
TAG=${1:-pagedserve-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${PAGEDSERVE_DOCKER_CACHE:-$HOME/.cache/pagedserve/docker}
TARBALL=$CACHE/bookworm-python3.11-rootfs.tar
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
  ROOT=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOT"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  # A virtual environment gives the image `python` and `pip` as the official
  # python:3.11-slim image has them, without Debian's externally-managed guard.
  chroot "$ROOT" python3 -m venv /opt/python
  chroot "$ROOT" apt-get clean
  rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin
  tar -C "$ROOT" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
fi
docker import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$TARBALL" "$TAG" >/dev/null
# A host whose HTTPS goes through an inspecting proxy trusts that proxy's CA through pip's `cert`
# setting; the image's pip needs the same bundle to reach the package index at build time.
CERT=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$CERT" ] && [ -f "$CERT" ]; then
  CTX=$(mktemp -d)
  cp "$CERT" "$CTX/host-ca.crt"
  printf 'FROM %s\nCOPY host-ca.crt /etc/ssl/certs/host-ca.crt\nENV PIP_CERT=/etc/ssl/certs/host-ca.crt\n' \
    "$TAG" >"$CTX/Dockerfile"
  docker build -q -t "$TAG" "$CTX" >/dev/null
  rm -rf "$CTX"
fi
echo "$TAG"
