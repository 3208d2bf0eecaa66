#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made without a container registry:
# debootstrap (minbase + python3, python3-venv), trimmed (apt lists and caches, docs, man pages,
# locales), imported into podman. The root file system's tar is kept in CACHE, so that a podman
# storage without the image imports it again in seconds instead of bootstrapping (about 100 s).
#
#   deploy/base-image.sh [TAG] [CACHE]      (root; defaults localhost/debian-py:bookworm /var/cache/p2pm)
#
# The Debian mirror is the machine's own (apt sources), or DEBIAN_MIRROR.
set -euo pipefail
TAG=${1:-localhost/debian-py:bookworm}
CACHE=${2:-/var/cache/p2pm}
if podman image exists "$TAG"; then echo "base image $TAG: present"; exit 0; fi
TAR="$CACHE/debian-py-bookworm.tar"
if [ ! -s "$TAR" ]; then
  MIRROR=${DEBIAN_MIRROR:-$( { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
            | awk '($1 == "URIs:" || $1 == "deb") && $2 ~ /\/debian\/?$/ {print $2; exit}')}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  mkdir -p "$CACHE"
  ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOTFS" "$TAR.part"' EXIT
  echo "base image $TAG: debootstrap bookworm from $MIRROR (about 100 s)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" >/dev/null
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
         "$ROOTFS"/usr/share/locale/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log
  tar -C "$ROOTFS" -cf "$TAR.part" .
  mv "$TAR.part" "$TAR"
fi
podman import -q --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$TAR" "$TAG" >/dev/null
echo "base image $TAG: imported from $TAR"
