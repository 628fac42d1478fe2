#!/usr/bin/env bash
# What the container tests and `make base-image` need on a Debian machine (root): podman with runc,
# debootstrap, and the podman settings these VMs need (cgroupfs, file events, ulimits within the hard ones).
set -euo pipefail
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
conf=/etc/containers/containers.conf
if ! grep -qs "rlhf-pipelines" "$conf"; then
  mkdir -p "$(dirname "$conf")"
  cat >>"$conf" <<'CONF'
# rlhf-pipelines (containers/setup-podman.sh): no systemd or journald here, and tight hard ulimits.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphDriverName}}'
