#!/usr/bin/env bash
# mmdebstrap --essential-hook for the base root filesystem: $1 is the rootfs,
# with only the Essential packages installed yet.
#
# Left alone, the base build makes the initramfs three times: the kernel's
# postinst.d hook, initramfs-tools' dpkg trigger once DKMS has installed
# zfs.ko, and the trigger again while customize.sh purges DKMS and the
# toolchain (measured: 30-50 s each on 2 cores, the first two thrown away).
# Until customize.sh has the final module set, update-initramfs is diverted
# to a no-op; customize.sh removes the diversion and builds it once.
set -euo pipefail

root=$1
chroot "$root" dpkg-divert --quiet --local --rename \
  --divert /usr/sbin/update-initramfs.appliance-build --add /usr/sbin/update-initramfs
cat >"$root/usr/sbin/update-initramfs" <<'STUB'
#!/bin/sh
# Diverted while the appliance base image is built (image/base/essential.sh);
# image/base/customize.sh runs the real one once at the end.
echo "update-initramfs $*: deferred to the end of the image build" >&2
exit 0
STUB
chmod 0755 "$root/usr/sbin/update-initramfs"
