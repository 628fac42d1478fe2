#!/usr/bin/env bash
# The base image for containers/Dockerfile, made without any container registry: a minimal Debian with
# Python 3.11 from Debian's own packages (debootstrap), imported into podman (or docker).
#   containers/base-image.sh [TAG]        default tag: localhost/rlhf-base:bookworm
# Needs root (debootstrap) and the Debian package mirror (DEBIAN_MIRROR, default deb.debian.org).
set -euo pipefail
tag="${1:-localhost/rlhf-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
engine="${CONTAINER_ENGINE:-podman}"

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $suite into $rootfs (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# What a component image never reads: package caches, indexes, manuals, translations.
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
tar --numeric-owner -C "$rootfs" -c . | "$engine" import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
"$engine" image inspect --format '{{.Size}}' "$tag" | awk -v tag="$tag" '{printf "%s: %.2f GB\n", tag, $1 / 1e9}'
