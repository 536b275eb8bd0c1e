#!/usr/bin/env bash
# Makes a Debian bookworm base image with Python 3.11 on PATH, from Debian's
# own mirror (debootstrap + docker import), for machines that reach
# deb.debian.org but no container registry. The root-filesystem tarball is
# cached, so a second run only imports it (or nothing, if the image is current).
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
# Same tarball and CA bundle as the image already tagged: keep it, so Docker's build cache stays valid.
CERT=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -n "$CERT" ] && [ -f "$CERT" ] || CERT=""
KEY=$(stat -c '%s-%Y' "$TARBALL")${CERT:+-$(sha256sum "$CERT" | cut -c1-16)}
if [ "$(docker image inspect -f '{{index .Config.Labels "pagedserve.base"}}' "$TAG" 2>/dev/null)" = "$KEY" ]; then
  echo "$TAG"
  exit 0
fi
docker import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$TARBALL" "$TAG-rootfs" >/dev/null
# A host whose HTTPS goes through an inspecting proxy trusts that proxy's CA through pip's `cert`
# setting; the image's pip needs the same bundle to reach the package index at build time.
CTX=$(mktemp -d)
{
  echo "FROM $TAG-rootfs"
  if [ -n "$CERT" ]; then
    cp "$CERT" "$CTX/host-ca.crt"
    echo "COPY host-ca.crt /etc/ssl/certs/host-ca.crt"
    echo "ENV PIP_CERT=/etc/ssl/certs/host-ca.crt"
  fi
  echo "LABEL pagedserve.base=$KEY"
} >"$CTX/Dockerfile"
docker build -q -t "$TAG" "$CTX" >/dev/null
rm -rf "$CTX"
docker rmi "$TAG-rootfs" >/dev/null 2>&1 || true
echo "$TAG"
