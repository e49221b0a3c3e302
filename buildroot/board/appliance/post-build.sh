#!/bin/sh
# Post-build script: runs on the target directory before the root
# filesystem image is made. $1 is TARGET_DIR.

set -e

TARGET_DIR="$1"

# The data partition (GPT label appliance-state, made by genimage.cfg, the
# same label as in the Debian-based image) holds the daemon's state, keys
# and CA, and survives A/B updates of the root slots.
# systemd-fstab-generator turns this line into a mount with fsck, and
# StateDirectory= in applianced.service orders the daemon after it.
FSTAB_LINE="PARTLABEL=appliance-state /var/lib/appliance ext4 defaults,noatime,nodev,nosuid,noexec 0 2"

if ! grep -q '^PARTLABEL=appliance-state ' "$TARGET_DIR/etc/fstab"; then
	echo "$FSTAB_LINE" >> "$TARGET_DIR/etc/fstab"
fi
