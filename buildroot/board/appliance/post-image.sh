#!/bin/sh
# Post-image script: lays out the EFI system partition for systemd-boot and
# assembles the GPT disk image described by genimage.cfg.
# $1 is BINARIES_DIR; the working directory is Buildroot's top directory.

set -e

BOARD_DIR="$(dirname "$0")"
BINARIES_DIR="${1:-$BINARIES_DIR}"
GENIMAGE_CFG="$BOARD_DIR/genimage.cfg"
EFI_PART="$BINARIES_DIR/efi-part"

# PARTUUID of root slot A (appliance-root-a), as written in genimage.cfg.
ROOT_A_UUID="$(awk '
	/partition appliance-root-a[ \t]*\{/ { slot = 1 }
	slot && /partition-uuid/ { gsub(/[" \t]/, ""); sub(/.*=/, ""); print; exit }
' "$GENIMAGE_CFG")"
if [ -z "$ROOT_A_UUID" ]; then
	echo "post-image.sh: no partition-uuid for appliance-root-a in $GENIMAGE_CFG" >&2
	exit 1
fi

CMDLINE="root=PARTUUID=$ROOT_A_UUID rootfstype=ext4 rootwait"
CMDLINE="$CMDLINE console=tty1 console=ttyS0,115200"

# The kernel of each slot lives on the ESP, under appliance/<slot>/. Slot B
# gets its kernel and loader entry from the first update that writes it.
install -D -m 0644 "$BINARIES_DIR/bzImage" "$EFI_PART/appliance/a/bzImage"

# Replace the generic entry the systemd package installs (it assumes
# root=/dev/sda2) with the appliance's own. editor=no keeps the kernel
# command line (and init=/bin/sh) out of reach of whoever has a keyboard.
rm -f "$EFI_PART/loader/entries/buildroot.conf"
mkdir -p "$EFI_PART/loader/entries"
cat > "$EFI_PART/loader/loader.conf" <<LOADER
default appliance-a.conf
timeout 3
editor no
LOADER
cat > "$EFI_PART/loader/entries/appliance-a.conf" <<ENTRY
title Storage appliance (slot A)
linux /appliance/a/bzImage
options $CMDLINE
ENTRY

support/scripts/genimage.sh -c "$GENIMAGE_CFG"
