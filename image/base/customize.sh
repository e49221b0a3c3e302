#!/usr/bin/env bash
# mmdebstrap --customize-hook for the base root filesystem: $1 is the rootfs
# (mmdebstrap has /dev, /proc and /sys mounted in it while hooks run).
#
# DKMS built zfs.ko for the image's kernel in zfs-dkms's postinst. Keeping
# DKMS would keep gcc, make and the kernel headers (~250 MB) in the image, and
# it would try to rebuild the module on the appliance. Instead the built
# modules are repackaged as a binary package, zfs-modules-<kver>, that
# Provides zfs-modules (what zfsutils-linux asks for), and DKMS, the headers
# and the compiler are purged. dpkg still owns every file of the image.
set -euo pipefail

root=$1
in_root() { chroot "$root" "$@"; }
step() { printf 'customize: %s\n' "$*" >&2; }

mapfile -t kernels < <(ls "$root/lib/modules")
if [ "${#kernels[@]}" -ne 1 ]; then
  echo "customize: expected exactly one kernel in the image, found: ${kernels[*]}" >&2
  exit 1
fi
kver=${kernels[0]}

step "kernel $kver; repackaging the DKMS build of zfs.ko"
built="$root/lib/modules/$kver/updates/dkms"
if ! ls "$built"/zfs.ko* >/dev/null 2>&1; then
  echo "customize: DKMS did not build zfs.ko for $kver; building it now" >&2
  in_root dkms autoinstall -k "$kver"
fi
ls "$built"/zfs.ko* "$built"/spl.ko* >/dev/null

zfs_version=$(in_root dpkg-query -W -f='${Version}' zfs-dkms)
zfs_upstream=${zfs_version#*:}
zfs_upstream=${zfs_upstream%%-*}
pkg="zfs-modules-$kver"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/pkg/DEBIAN" "$work/pkg/lib/modules/$kver/extra/zfs"
cp -a "$built"/*.ko* "$work/pkg/lib/modules/$kver/extra/zfs/"
cat >"$work/pkg/DEBIAN/control" <<EOF
Package: $pkg
Version: $zfs_version
Architecture: amd64
Maintainer: Appliance image build <image@appliance.invalid>
Depends: linux-image-$kver
Provides: zfs-modules (= $zfs_upstream)
Section: contrib/kernel
Priority: optional
Description: OpenZFS kernel modules for Linux $kver
 Built by zfs-dkms $zfs_version at image build time and repackaged, so the
 appliance carries no compiler or kernel headers.
EOF
cat >"$work/pkg/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
depmod -a $kver
EOF
cat >"$work/pkg/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ -d /lib/modules/$kver ]; then depmod -a $kver; fi
EOF
chmod 0755 "$work/pkg/DEBIAN/postinst" "$work/pkg/DEBIAN/postrm"
dpkg-deb --root-owner-group -Zxz --build "$work/pkg" "$root/tmp/$pkg.deb"

# DKMS's copy of the modules and its build tree go before the package is
# installed: the package's depmod then sees only extra/zfs, and zfs-dkms's
# prerm (which runs `dkms remove` only when `dkms status` lists the module)
# has nothing left to do. Measured: dkms remove spent ~27 s, mostly in two
# depmod runs over every module of the kernel.
rm -rf "$built" "$root/var/lib/dkms/zfs"

export DEBIAN_FRONTEND=noninteractive
in_root dpkg -i "/tmp/$pkg.deb"
rm -f "$root/tmp/$pkg.deb"

# Purge DKMS and everything it pulled in. zfsutils-linux must survive (its
# zfs-modules alternative is now the package above). The toolchain is named
# explicitly: apt does not always consider it unused once DKMS is gone.
step "purging DKMS, the kernel headers and the toolchain"
in_root apt-get purge -y -q zfs-dkms dkms 'linux-headers-*' 'linux-kbuild-*'
toolchain=()
for p in gcc gcc-12 cpp cpp-12 make binutils binutils-common binutils-x86-64-linux-gnu \
  libc6-dev libc-dev-bin linux-libc-dev libgcc-12-dev libcrypt-dev libnsl-dev libtirpc-dev \
  rpcsvc-proto patch pahole; do
  if in_root dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    toolchain+=("$p")
  fi
done
if [ ${#toolchain[@]} -gt 0 ]; then
  in_root apt-get purge -y -q "${toolchain[@]}"
fi
in_root apt-get autoremove --purge -y -q
for p in zfsutils-linux zfs-zed "$pkg" "linux-image-$kver"; do
  in_root dpkg-query -W -f='${Status}\n' "$p" | grep -q 'install ok installed' || {
    echo "customize: $p was removed with DKMS" >&2
    exit 1
  }
done
for tool in gcc cc make cpp; do
  if in_root sh -c "command -v $tool" >/dev/null 2>&1; then
    path=$(in_root sh -c "readlink -f \"\$(command -v $tool)\"")
    echo "customize: $tool is still in the image ($path, from $(in_root dpkg -S "$path" 2>&1 | head -1))" >&2
    exit 1
  fi
done
# The package's postinst ran depmod (and nothing since touched
# /lib/modules); check its result instead of running it again.
test -e "$root/lib/modules/$kver/extra/zfs/zfs.ko" || ls "$root/lib/modules/$kver/extra/zfs/"zfs.ko* >/dev/null
grep -q 'extra/zfs/zfs.ko' "$root/lib/modules/$kver/modules.dep"
if grep -q 'updates/dkms' "$root/lib/modules/$kver/modules.dep"; then
  echo "customize: modules.dep still lists DKMS's copy of the modules" >&2
  exit 1
fi

# The one initramfs build (essential.sh deferred every earlier one), now that
# the module set is final.
step "building the initramfs"
rm -f "$root/usr/sbin/update-initramfs"
in_root dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
in_root update-initramfs -c -k "$kver"
test -s "$root/boot/initrd.img-$kver"

step "cleaning up"
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/var/tmp/*
rm -rf "$root"/var/lib/dkms
step "done"
