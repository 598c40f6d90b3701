#!/usr/bin/env bash
# Install what scripts/build_images.sh needs (buildah, debootstrap) with apt-get, when missing.
# Best effort: where they cannot be installed (not root, no apt), say so and exit 0; the image
# tests (tests/deploy) then skip with the reason.
set -euo pipefail

command -v buildah >/dev/null && command -v debootstrap >/dev/null && exit 0

if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "setup_containers: buildah/debootstrap missing and not installable here (needs root and apt-get)" >&2
  exit 0
fi
log="$(mktemp /tmp/setup_containers.XXXXXX.log)"
if { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
       apt-get install -y -q --no-install-recommends buildah debootstrap; } >"$log" 2>&1; then
  echo "setup_containers: installed $(buildah --version)"
  rm -f "$log"
else
  tail -n 5 "$log" >&2
  echo "setup_containers: apt-get could not install buildah and debootstrap (log: $log)" >&2
fi
