#!/usr/bin/env bash
# Builds the appliance image: image/out/appliance.img (raw GPT, boots as a
# whole disk under UEFI with systemd-boot), appliance.img.bmap and
# appliance.img.zst (for `bmaptool copy` or `zstdcat ... | dd`).
#
# Usage: image/build.sh [--out DIR] [--no-host-deps]
#   APPLIANCE_IMAGE_CACHE  cache directory (default /var/cache/appliance-image)
#
# Needs root (mmdebstrap --mode=root, chroot, file ownership in the root fs).
#
# Three cached stages, each keyed by a hash of its inputs, kept OUTSIDE the
# repository so a fresh clone on the same machine (CI) reuses them:
#   base   image/base/*: Debian bookworm + backports, kernel, zfs.ko built by
#          DKMS and repackaged (10-13 min on 2 cores, of which DKMS compiling
#          zfs.ko takes ~9: the only slow stage)
#   deb    our binaries (target/release/applianced, appliancectl), the unit,
#          udev rules, config and maintainer scripts -> applianced_*.deb
#          (cargo-deb)
#   image  base + deb + image/rootfs + this script -> appliance.img, .bmap, .zst
# An unchanged rebuild only runs `cargo build` (no-op) and hashes.
#
# Disk layout (GPT, 1 MiB aligned; sizes below):
#   1 ESP        vfat  systemd-boot, kernel + initrd of each slot
#   2 root-a     ext4  the root file system (slot A, booted)
#   3 root-b     -     reserved for slot B (A/B updates), empty
#   4 state      ext4  /var/lib/appliance: keys, CA, first-boot record;
#                      survives updates
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
here=$repo/image
out=$here/out
host_deps=1
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --no-host-deps) host_deps=0; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cache=${APPLIANCE_IMAGE_CACHE:-/var/cache/appliance-image}

# Layout constants. The disk GUID identifies the boot disk to the udev rules
# (udev/62-appliance-disks.rules): keep the two in sync.
BOOT_DISK_GUID=5f1e3b2a-6c0d-4e8f-9a71-3b2c4d5e6f70
ESP_UUID=8d3a5c10-2b4e-4f6a-9c1d-0e2f3a4b5c61
ROOT_A_UUID=8d3a5c10-2b4e-4f6a-9c1d-0e2f3a4b5c62
ROOT_B_UUID=8d3a5c10-2b4e-4f6a-9c1d-0e2f3a4b5c63
STATE_UUID=8d3a5c10-2b4e-4f6a-9c1d-0e2f3a4b5c64
ROOT_A_FS_UUID=3c9e1f42-7a5b-4d8c-b16e-2f0a9d8c7b61
STATE_FS_UUID=3c9e1f42-7a5b-4d8c-b16e-2f0a9d8c7b64
ESP_MIB=256
ROOT_MIB=2048
STATE_MIB=512
GPT_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
GPT_ROOT_X86_64=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
GPT_LINUX_DATA=0FC63DAF-8483-4772-8E79-3D69D8477DE4
KERNEL_CMDLINE="rw console=tty0 console=ttyS0,115200 loglevel=4 systemd.show_status=1"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap --mode=root, chroot, file ownership)"

# --- host packages ------------------------------------------------------------
# qemu-utils on these machines comes from bookworm-backports, so QEMU itself
# must too (bookworm's qemu-system-x86 7.2 conflicts with it).
install_host_deps() {
  local pkgs=(mmdebstrap dosfstools mtools e2fsprogs fdisk bmap-tools zstd
    dpkg-dev qemu-system-x86 qemu-utils ovmf ca-certificates)
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing host packages: ${missing[*]}"
  local bpo=/etc/apt/sources.list.d/appliance-host-backports.sources
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat >"$bpo" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${missing[@]}"
}
[ "$host_deps" = 1 ] && install_host_deps

# sha256 over the named files and directories (paths relative to the repo,
# so the key is the same in any clone).
hash_inputs() {
  (
    cd "$repo"
    find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -c1-16
}

mkdir -p "$cache/base" "$cache/deb" "$cache/image" "$out"
exec 9>"$cache/.lock"
flock 9
t_build=$SECONDS

# What a build killed part-way left behind (its EXIT trap never ran): a work
# directory of several GiB, a partial base tarball or image. Holding the lock,
# no other build is using them.
stale=$( {
  find "$cache" -mindepth 1 -maxdepth 1 -name 'work.*'
  find "$cache/base" "$cache/image" -mindepth 1 -maxdepth 1 \( -name 'partial-*.tar' -o -name '*.partial' \)
} | LC_ALL=C sort)
if [ -n "$stale" ]; then
  log "removing what an interrupted build left: $(echo "$stale" | xargs -d '\n' du -sch | tail -1 | cut -f1) in $(echo "$stale" | wc -l) paths"
  echo "$stale" | xargs -d '\n' rm -rf
fi
space() { log "disk: $(df -h --output=avail "$cache" | tail -1 | tr -d ' ') free under $cache, $(df -h --output=avail "$out" | tail -1 | tr -d ' ') under $out"; }
space

# --- stage 1: base root fs ------------------------------------------------------
base_key=$(hash_inputs image/base)
base_tar=$cache/base/base-$base_key.tar
if [ -f "$base_tar" ]; then
  log "base: cached ($base_tar)"
else
  log "base: building $base_key (mmdebstrap + DKMS; 10-13 min on 2 cores)"
  t0=$SECONDS
  partial=$cache/base/partial-$base_key.tar
  rm -f "$partial"
  "$here/base/mkbase.sh" "$partial"
  mv "$partial" "$base_tar"
  log "base: built in $((SECONDS - t0)) s"
  # Keep the newest two base tarballs (each about a GiB).
  ls -1t "$cache"/base/base-*.tar | tail -n +3 | xargs -r rm -f
fi

# --- stage 2: our Debian package ------------------------------------------------
if ! command -v cargo-deb >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-deb" ]; then
  log "installing cargo-deb from crates.io"
  cargo install --locked cargo-deb
fi
t0=$SECONDS
log "deb: cargo build --release (applianced, appliancectl)"
(cd "$repo" && cargo build --release -p applianced -p appliancectl)
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || die "cannot find cargo's target directory"
deb_key=$( {
  sha256sum "$target_dir/release/applianced" "$target_dir/release/appliancectl" | cut -d' ' -f1
  hash_inputs appliance/daemon/Cargo.toml appliance/daemon/config systemd udev image/deb appliance/README.md
} | sha256sum | cut -c1-16)
deb=$cache/deb/applianced-$deb_key.deb
if [ -f "$deb" ]; then
  log "deb: cached ($deb)"
else
  log "deb: cargo deb ($deb_key)"
  tmpdeb=$(mktemp -d)
  # --fast: the package is only ever installed into the image by this
  # script, so its size does not matter; xz at the default level took 30 s
  # of a clean build, --fast 6 s (12 MB -> 14 MB).
  (cd "$repo" && cargo deb -p applianced --no-build --no-dbgsym --fast --output "$tmpdeb/")
  mv "$tmpdeb"/*.deb "$deb"
  rm -rf "$tmpdeb"
  ls -1t "$cache"/deb/applianced-*.deb | tail -n +6 | xargs -r rm -f
fi
log "deb: done in $((SECONDS - t0)) s"

# --- stage 3: the disk image ------------------------------------------------------
image_key=$( {
  echo "$base_key" "$deb_key"
  hash_inputs image/build.sh image/rootfs
} | sha256sum | cut -c1-16)
final=$cache/image/$image_key
publish() {
  local f
  # Hard links where out/ is on the cache's file system: the image is about
  # 1.5 GiB allocated, and nothing writes to it in place (the tests and
  # appliance-vm boot a qcow2 overlay on it; bmaptool and dd only read it).
  # A copy elsewhere.
  for f in appliance.img appliance.img.bmap appliance.img.zst; do
    rm -f "$out/$f.tmp"
    ln "$final/$f" "$out/$f.tmp" 2>/dev/null ||
      cp --sparse=always --reflink=auto "$final/$f" "$out/$f.tmp"
    mv -f "$out/$f.tmp" "$out/$f"
  done
  echo "$image_key" >"$out/appliance.img.key"
  log "image: $out/appliance.img ($(du -h --apparent-size "$out/appliance.img" | cut -f1) sparse, $(du -h "$out/appliance.img" | cut -f1) allocated), .bmap, .zst ($(du -h "$out/appliance.img.zst" | cut -f1))"
}
if [ -f "$final/appliance.img.zst" ]; then
  log "image: cached ($final)"
  if [ "$(cat "$out/appliance.img.key" 2>/dev/null)" != "$image_key" ]; then publish; else log "image: $out is current"; fi
  log "total: $((SECONDS - t_build)) s"
  exit 0
fi

t0=$SECONDS
log "image: assembling $image_key"
work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir "$root"
tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base_tar"

# Our package, through dpkg, so the image has normal package metadata.
cp "$deb" "$root/tmp/applianced.deb"
chroot "$root" dpkg -i /tmp/applianced.deb
rm -f "$root/tmp/applianced.deb"

# The image's own files (first boot, fstab, network, VM-only forwards).
tar -C "$here/rootfs" --owner=0 --group=0 --numeric-owner -cf - . |
  tar -C "$root" --keep-directory-symlink --no-overwrite-dir -xf -
systemctl --root="$root" enable appliance-firstboot.service appliance-provision.service appliance-zfs-mount.service appliance-zfs-mount.path systemd-networkd.service \
  appliance-vm-metrics.socket applianced.service
# The pools are imported at boot from /etc/zfs/zpool.cache
# (zfs-import-cache). Should that file be missing or empty (a box restarted
# before anything wrote it), zfs-import-scan, which runs only then, imports
# the pools it finds on the disks instead of leaving the box with none.
systemctl --root="$root" enable zfs-import-scan.service
# Nothing on the appliance waits for network-online.target; a box booted
# without a cable must not end up with a failed unit after two minutes.
systemctl --root="$root" disable systemd-networkd-wait-online.service
# Each clone of the image gets its own machine id on first boot.
echo uninitialized >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# The daemon's user owns the state partition's root (it is its StateDirectory).
app_uid=$(chroot "$root" id -u appliance)
app_gid=$(chroot "$root" id -g appliance)

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
sdboot=$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[ -f "$kernel" ] && [ -f "$initrd" ] && [ -f "$sdboot" ] || die "kernel, initrd or systemd-boot missing in the root fs"
kver=${kernel##*/vmlinuz-}

# Partition images: no loop devices, no mounts.
log "image: file systems"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}
mkfs.ext4 -q -F -L root-a -U "$ROOT_A_FS_UUID" -E root_owner=0:0 -d "$root" \
  "$work/root-a.img" "${ROOT_MIB}M"
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
cp "$sdboot" "$work/systemd-bootx64.efi"
kernel=$work/vmlinuz initrd=$work/initrd.img sdboot=$work/systemd-bootx64.efi
# The tree is in root-a.img now; from here on each piece is deleted as soon
# as it has been copied on, so the build's peak disk use stays near one image.
rm -rf "$root"
mkdir "$work/state"
mkfs.ext4 -q -F -L appliance-state -U "$STATE_FS_UUID" -E "root_owner=$app_uid:$app_gid" \
  -d "$work/state" "$work/state.img" "${STATE_MIB}M"

mkfs.vfat -F 32 -n ESP -C "$work/esp.img" $((ESP_MIB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
esp=(-i "$work/esp.img")
mmd "${esp[@]}" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/appliance-a
mcopy "${esp[@]}" "$sdboot" ::/EFI/BOOT/BOOTX64.EFI
mcopy "${esp[@]}" "$sdboot" ::/EFI/systemd/systemd-bootx64.efi
mcopy "${esp[@]}" "$kernel" ::/appliance-a/vmlinuz
mcopy "${esp[@]}" "$initrd" ::/appliance-a/initrd.img
printf 'default appliance-a.conf\ntimeout 0\nconsole-mode keep\neditor no\n' >"$work/loader.conf"
cat >"$work/appliance-a.conf" <<EOF
title   Appliance (slot A, Linux $kver)
linux   /appliance-a/vmlinuz
initrd  /appliance-a/initrd.img
options root=PARTUUID=$ROOT_A_UUID $KERNEL_CMDLINE
EOF
mcopy "${esp[@]}" "$work/loader.conf" ::/loader/loader.conf
mcopy "${esp[@]}" "$work/appliance-a.conf" ::/loader/entries/appliance-a.conf

# GPT on a sparse file, then each partition copied in at its offset.
img=$work/appliance.img
esp_start=1
root_a_start=$((esp_start + ESP_MIB))
root_b_start=$((root_a_start + ROOT_MIB))
state_start=$((root_b_start + ROOT_MIB))
total_mib=$((state_start + STATE_MIB + 1))
truncate -s "${total_mib}M" "$img"
sfdisk --quiet "$img" <<EOF
label: gpt
label-id: $BOOT_DISK_GUID
unit: sectors
first-lba: 2048

start=$((esp_start * 2048)), size=$((ESP_MIB * 2048)), type=$GPT_ESP, uuid=$ESP_UUID, name="esp"
start=$((root_a_start * 2048)), size=$((ROOT_MIB * 2048)), type=$GPT_ROOT_X86_64, uuid=$ROOT_A_UUID, name="appliance-root-a"
start=$((root_b_start * 2048)), size=$((ROOT_MIB * 2048)), type=$GPT_LINUX_DATA, uuid=$ROOT_B_UUID, name="appliance-root-b"
start=$((state_start * 2048)), size=$((STATE_MIB * 2048)), type=$GPT_LINUX_DATA, uuid=$STATE_UUID, name="appliance-state"
EOF
dd if="$work/esp.img" of="$img" bs=1M seek=$esp_start conv=notrunc,sparse status=none
rm "$work/esp.img"
dd if="$work/root-a.img" of="$img" bs=1M seek=$root_a_start conv=notrunc,sparse status=none
rm "$work/root-a.img"
dd if="$work/state.img" of="$img" bs=1M seek=$state_start conv=notrunc,sparse status=none
rm "$work/state.img"
space

log "image: bmap and zstd"
bmaptool -q create -o "$work/appliance.img.bmap" "$img"
zstd -q -3 -T0 "$img" -o "$work/appliance.img.zst"

mkdir -p "$final.partial"
mv "$img" "$work/appliance.img.bmap" "$work/appliance.img.zst" "$final.partial/"
rm -rf "$final"
mv "$final.partial" "$final"
# Keep this image and the one before it.
ls -1dt "$cache"/image/*/ | tail -n +3 | xargs -r rm -rf
publish
log "image: done in $((SECONDS - t0)) s"
log "total: $((SECONDS - t_build)) s"
