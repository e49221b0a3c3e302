#!/usr/bin/env bash
# Builds the base root filesystem of the appliance as a tarball: Debian
# bookworm + bookworm-backports (kernel 6.12, OpenZFS 2.3 with zfs.ko built by
# DKMS and repackaged, see customize.sh), without our own packages.
#
# Usage: mkbase.sh OUTPUT.tar
#
# Everything this produces depends only on the files in this directory (and
# on the Debian archive), so build.sh caches it by their hash: changing our
# code or the image layout never rebuilds the kernel module.
set -euo pipefail

out=$1
here=$(cd "$(dirname "$0")" && pwd)
mirror=${APPLIANCE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${APPLIANCE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages")
include=$(IFS=,; echo "${packages[*]}")

# Each line of mmdebstrap's and the hooks' output gets the time of day, so the
# build log shows where the time goes (mmdebstrap's "I:" lines mark its
# phases, customize.sh logs its steps).
stamp() {
  local line
  while IFS= read -r line; do printf '[%s] %s\n' "$(date +%H:%M:%S)" "$line"; done
}

# mmdebstrap hands apt a pipe as `cat >&N`, which /bin/sh (dash) parses only
# for a single-digit N: with enough descriptors inherited from the caller
# (flock's, the cache lock in build.sh, a CI runner's) N reaches 10 and the
# download fails with "Syntax error: Bad fd number". mmdebstrap needs none of
# them (build.sh keeps its lock: it is its own process).
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

# Sources are spelled out here, not taken from the host: main + contrib
# (OpenZFS is in contrib) for bookworm, its updates, security and backports.
mmdebstrap \
  --mode=root \
  --format=tar \
  --variant=minbase \
  --architectures=amd64 \
  --include="$include" \
  --dpkgopt="$here/dpkg-excludes" \
  --aptopt='Acquire::Retries "3"' \
  --setup-hook='mkdir -p "$1/etc/apt/preferences.d"' \
  --setup-hook="cp '$here/backports.pref' \"\$1/etc/apt/preferences.d/appliance-backports.pref\"" \
  --essential-hook="'$here/essential.sh' \"\$1\"" \
  --customize-hook="'$here/customize.sh' \"\$1\"" \
  bookworm "$out" \
  "deb $mirror bookworm main contrib" \
  "deb $mirror bookworm-updates main contrib" \
  "deb $security bookworm-security main contrib" \
  "deb $mirror bookworm-backports main contrib" \
  2>&1 | stamp >&2
