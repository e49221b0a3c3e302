#!/usr/bin/env bash
# Checks this BR2_EXTERNAL tree against a Buildroot checkout, without
# building anything (no network needed):
#
#   1. make appliance_x86_64_defconfig: no kconfig warnings (invalid
#      values), and every symbol of the defconfig known and applied (the
#      kconfig in Buildroot drops unknown symbols silently, so each one is
#      looked up in the resulting .config);
#   2. make savedefconfig gives back configs/appliance_x86_64_defconfig
#      byte for byte (nothing dropped, nothing reordered);
#   3. utils/check-package -b reports nothing on any file of the tree;
#   4. make applianced-show-info lists the package with its build
#      dependencies, and make show-info lists what it pulls in at run time;
#   5. consistency with the repository: the package version, the files the
#      package installs, the users, the boot disk GUID the udev rules
#      expect, and the Rust version Buildroot ships;
#   6. post-image.sh and genimage.cfg, run on stand-in inputs, make a GPT
#      disk with the expected partitions (skipped when genimage, mtools,
#      dosfstools, e2fsprogs or sfdisk are missing);
#   7. make applianced-rsync copies every workspace member and every file
#      the package installs (read with "cargo metadata --no-deps", which
#      compiles nothing, when cargo is installed).
#
# Usage: buildroot/check.sh BUILDROOT_DIR
# Exit status: 0 when every check passes, 1 otherwise, 2 on usage errors.
#
# Host tools: what Buildroot needs for "make defconfig" (make, gcc, g++,
# rsync, cpio, unzip, bc, file, perl, python3, wget); for check-package,
# the Debian packages python3-magic, flake8 and the ShellCheck linter;
# optionally genimage, mtools, dosfstools, e2fsprogs and fdisk (sfdisk)
# for check 6.

set -u

if [ $# -ne 1 ] || [ ! -f "$1/Makefile" ] || [ ! -x "$1/utils/check-package" ]; then
	echo "usage: $0 BUILDROOT_DIR (a Buildroot source tree)" >&2
	exit 2
fi

BR_DIR="$(cd "$1" && pwd)"
EXT_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_DIR="$(cd "$EXT_DIR/.." && pwd)"
DEFCONFIG=appliance_x86_64_defconfig
WORK="$(mktemp -d)"
OUT="$WORK/output"
trap 'rm -rf "$WORK"' EXIT

RESULTS=()
FAILED=0

pass() { RESULTS+=("PASS  $1"); echo "PASS: $1"; }
fail() { RESULTS+=("FAIL  $1"); FAILED=1; echo "FAIL: $1"; }
skip() { RESULTS+=("SKIP  $1"); echo "SKIP: $1"; }
step() { printf '\n=== %s\n' "$1"; }

brmake() {
	make --no-print-directory -C "$BR_DIR" BR2_EXTERNAL="$EXT_DIR" O="$OUT" "$@"
}

BR_VERSION="$(git -C "$BR_DIR" describe --tags 2>/dev/null || echo unknown)"
echo "Buildroot:   $BR_DIR ($BR_VERSION)"
echo "BR2_EXTERNAL: $EXT_DIR"

# 1 ---------------------------------------------------------------------
step "1. make $DEFCONFIG"
if ! brmake "$DEFCONFIG" > "$WORK/defconfig.log" 2>&1; then
	cat "$WORK/defconfig.log"
	fail "defconfig: make failed"
elif grep -i 'warning' "$WORK/defconfig.log"; then
	fail "defconfig: kconfig warnings (above)"
else
	tail -n 3 "$WORK/defconfig.log"
	# Buildroot's kconfig drops an unknown symbol without a word, and an
	# option whose dependencies are unmet just as quietly: look each one up
	# in the resulting .config.
	bad=0
	total=0
	while IFS= read -r line; do
		case "$line" in
		"# BR2_"*" is not set")
			sym="${line#\# }"
			sym="${sym%% *}"
			;;
		BR2_*=*)
			sym="${line%%=*}"
			;;
		*)
			continue
			;;
		esac
		total=$((total + 1))
		if ! grep -Eq "^($sym=|# $sym is not set\$)" "$OUT/.config"; then
			echo "unknown symbol: $sym"
			bad=1
		elif ! grep -Fxq "$line" "$OUT/.config"; then
			echo "not applied (unmet dependencies?): $line; .config has: $(grep -E "^($sym=|# $sym is not set)" "$OUT/.config")"
			bad=1
		fi
	done < "$EXT_DIR/configs/$DEFCONFIG"
	if [ "$bad" = 0 ]; then
		pass "defconfig: no warnings, all $total symbols known and applied"
	else
		fail "defconfig: unknown or unapplied symbols (above)"
	fi
fi

# 2 ---------------------------------------------------------------------
step "2. make savedefconfig (round trip)"
if [ ! -f "$OUT/.config" ]; then
	fail "savedefconfig: no .config (check 1 failed)"
elif ! brmake savedefconfig BR2_DEFCONFIG="$WORK/saved_defconfig" \
	> "$WORK/savedefconfig.log" 2>&1; then
	cat "$WORK/savedefconfig.log"
	fail "savedefconfig: make failed"
elif diff -u "$EXT_DIR/configs/$DEFCONFIG" "$WORK/saved_defconfig"; then
	pass "savedefconfig: identical to configs/$DEFCONFIG"
else
	fail "savedefconfig: differs from configs/$DEFCONFIG (diff above)"
fi

# 3 ---------------------------------------------------------------------
step "3. utils/check-package -b (every file of the tree)"
# check-package needs the "magic" module (python3-magic); the python3 first
# in PATH may not have it while the system one does.
PYTHON=""
for py in python3 /usr/bin/python3; do
	if "$py" -c 'import magic' 2>/dev/null; then
		PYTHON="$py"
		break
	fi
done
if [ -z "$PYTHON" ]; then
	fail "check-package: no python3 with the magic module (python3-magic)"
else
	mapfile -t FILES < <(cd "$EXT_DIR" && find . ! -type d | sed 's|^\./||' | sort)
	if (cd "$EXT_DIR" && "$PYTHON" "$BR_DIR/utils/check-package" -b "${FILES[@]}") \
		> "$WORK/check-package.log" 2>&1; then
		cat "$WORK/check-package.log"
		pass "check-package: ${#FILES[@]} files, no warnings"
	else
		cat "$WORK/check-package.log"
		fail "check-package: warnings (above)"
	fi
fi

# 4 ---------------------------------------------------------------------
step "4. make applianced-show-info / show-info"
if [ ! -f "$OUT/.config" ]; then
	fail "show-info: no .config (check 1 failed)"
elif ! brmake -s applianced-show-info > "$WORK/pkg-info.json" 2> "$WORK/pkg-info.err" ||
	! brmake -s show-info > "$WORK/all-info.json" 2> "$WORK/all-info.err"; then
	cat "$WORK/pkg-info.err" "$WORK/all-info.err"
	fail "show-info: make failed"
elif python3 - "$WORK/pkg-info.json" "$WORK/all-info.json" <<'EOF'
import json
import sys

def load(path):
    # make may print other lines; the JSON document is the one starting "{".
    with open(path) as f:
        lines = [line for line in f if line.startswith("{")]
    return json.loads(lines[-1])

pkg = load(sys.argv[1])
everything = load(sys.argv[2])
errors = []

info = pkg.get("applianced")
if info is None:
    sys.exit("applianced is not in applianced-show-info")
print("applianced %s (%s), site %s" % (
    info["version"], info["type"], info["downloads"][0]["uris"][0]))
print("  build dependencies: %s" % ", ".join(info["dependencies"]))
for dep in ("host-rustc", "toolchain", "skeleton"):
    if dep not in info["dependencies"]:
        errors.append("applianced does not depend on %s" % dep)

# Selected by BR2_PACKAGE_APPLIANCED or needed by what it installs.
print("  with, in the same configuration:")
for name in ("host-rust-bin", "zfs", "systemd", "linux", "linux-headers",
             "ca-certificates", "host-genimage"):
    if name in everything:
        print("    %-16s %s" % (name, everything[name].get("version")))
    else:
        errors.append("%s is not in show-info" % name)
if "applianced" not in everything:
    errors.append("applianced is not in show-info")

for e in errors:
    print("error: " + e)
sys.exit(1 if errors else 0)
EOF
then
	pass "show-info: applianced listed with host-rustc; zfs, systemd, linux selected"
else
	fail "show-info: assertions failed (above)"
fi

# 5 ---------------------------------------------------------------------
step "5. consistency with the repository"
MK="$EXT_DIR/package/applianced/applianced.mk"
ok=1

MK_VERSION="$(sed -n 's/^APPLIANCED_VERSION = //p' "$MK")"
WS_VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$REPO_DIR/Cargo.toml")"
echo "package version $MK_VERSION, workspace version $WS_VERSION"
if [ -z "$MK_VERSION" ] || [ "$MK_VERSION" != "$WS_VERSION" ]; then
	echo "error: APPLIANCED_VERSION differs from the workspace version"
	ok=0
fi

for f in Cargo.toml Cargo.lock appliance/daemon/config/appliance.toml \
	systemd/applianced.service systemd/appliance.sysusers.conf \
	systemd/appliance.tmpfiles.conf; do
	if [ ! -f "$REPO_DIR/$f" ]; then
		echo "error: the package installs or builds from $f, which is missing"
		ok=0
	fi
done
for crate in applianced appliancectl; do
	if ! grep -rqs "^name = \"$crate\"" "$REPO_DIR"/appliance/*/Cargo.toml; then
		echo "error: no crate named $crate in appliance/"
		ok=0
	fi
done
RULES=""
for f in "$REPO_DIR"/udev/*.rules; do
	[ -e "$f" ] && RULES="$RULES ${f#"$REPO_DIR"/}"
done
echo "udev rules that the package would install:${RULES:- none yet}"

# The udev rules tell the boot disk from data disks by its GPT disk GUID:
# the image must carry the same one.
RULES_GUID="$(cat "$REPO_DIR"/udev/*.rules 2>/dev/null |
	sed -n 's/.*ENV{ID_PART_TABLE_UUID}=="\([0-9a-fA-F-]*\)".*APPLIANCE_BOOT_DISK.*/\1/p' | head -n 1)"
DISK_GUID="$(sed -n 's/^[[:space:]]*disk-uuid = "\(.*\)"/\1/p' "$EXT_DIR/board/appliance/genimage.cfg")"
if [ -z "$RULES_GUID" ]; then
	echo "boot disk GUID: the udev rules name none (image has $DISK_GUID)"
elif [ "$RULES_GUID" = "$DISK_GUID" ]; then
	echo "boot disk GUID: $DISK_GUID, as in the udev rules"
else
	echo "error: genimage.cfg disk-uuid $DISK_GUID, the udev rules expect $RULES_GUID"
	ok=0
fi

# Every user and group of the sysusers.d file is also created at build time.
while read -r kind name _; do
	case "$kind" in
	u|g)
		if ! grep -Eq "^[[:space:]]+(- - $name |$name )" "$MK"; then
			echo "error: $kind $name from appliance.sysusers.conf is not in APPLIANCED_USERS"
			ok=0
		fi
		;;
	esac
done < "$REPO_DIR/systemd/appliance.sysusers.conf"

# The Rust toolchain Buildroot ships must satisfy the workspace and the
# locked dependencies (those in the local cargo registry cache).
RUST_VERSION="$(sed -n 's/^RUST_BIN_VERSION = //p' "$BR_DIR/package/rust-bin/rust-bin.mk")"
if ! python3 - "$REPO_DIR" "$RUST_VERSION" <<'EOF'
import glob
import os
import re
import sys

repo, rust = sys.argv[1], sys.argv[2]

def ver(s):
    parts = [int(x) for x in re.findall(r"\d+", s)][:3]
    return tuple(parts + [0] * (3 - len(parts)))

with open(os.path.join(repo, "Cargo.toml")) as f:
    m = re.search(r'^rust-version\s*=\s*"([^"]+)"', f.read(), re.M)
need = [(ver(m.group(1)), "workspace")] if m else []
with open(os.path.join(repo, "Cargo.lock")) as f:
    locked = re.findall(r'name = "([^"]+)"\nversion = "([^"]+)"\nsource = "registry', f.read())
roots = glob.glob(os.path.expanduser("~/.cargo/registry/src/*"))
seen = 0
for name, version in locked:
    for root in roots:
        path = os.path.join(root, "%s-%s" % (name, version), "Cargo.toml")
        if os.path.exists(path):
            seen += 1
            with open(path) as f:
                m = re.search(r'^rust-version\s*=\s*"([^"]+)"', f.read(), re.M)
            if m:
                need.append((ver(m.group(1)), "%s %s" % (name, version)))
            break
need.sort(reverse=True)
print("Buildroot's Rust: %s; locked crates found in the cargo cache: %d of %d"
      % (rust, seen, len(locked)))
if need:
    print("highest rust-version required: %s (%s)"
          % (".".join(map(str, need[0][0])), need[0][1]))
too_new = [n for v, n in need if v > ver(rust)]
for n in too_new:
    print("error: %s needs a newer Rust than %s" % (n, rust))
sys.exit(1 if too_new else 0)
EOF
then
	ok=0
fi

if [ "$ok" = 1 ]; then
	pass "consistency: version, installed files, users, boot disk GUID, Rust $RUST_VERSION"
else
	fail "consistency: see errors above"
fi

# 6 ---------------------------------------------------------------------
step "6. post-image.sh + genimage.cfg on stand-in inputs"
missing=""
for tool in genimage mkdosfs mcopy mke2fs e2fsck sfdisk; do
	command -v "$tool" > /dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
	skip "post-image: missing host tools:$missing"
else
	IMG="$WORK/images"
	mkdir -p "$IMG/efi-part/EFI/BOOT" "$IMG/efi-part/loader/entries" "$WORK/build"
	echo stand-in > "$IMG/efi-part/EFI/BOOT/bootx64.efi"
	echo stand-in > "$IMG/efi-part/loader/entries/buildroot.conf"
	head -c 65536 /dev/zero > "$IMG/bzImage"
	mke2fs -q -t ext4 -L rootfs "$IMG/rootfs.ext4" 64M
	: > "$WORK/dot-config"
	if ! (cd "$BR_DIR" && BUILD_DIR="$WORK/build" BR2_CONFIG="$WORK/dot-config" \
		BINARIES_DIR="$IMG" "$EXT_DIR/board/appliance/post-image.sh" "$IMG") \
		> "$WORK/post-image.log" 2>&1; then
		cat "$WORK/post-image.log"
		fail "post-image: script failed"
	else
		sfdisk -d "$IMG/appliance.img" | sed -n 's|^.*appliance.img\([0-9]\) :|part\1:|p'
		names="$(sfdisk -d "$IMG/appliance.img" | sed -n 's/.*name="\([^"]*\)".*/\1/p' | tr '\n' ' ')"
		root_a="$(sfdisk -d "$IMG/appliance.img" | sed -n 's/.*uuid=\([^,]*\), name="appliance-root-a".*/\1/p' | tr 'A-F' 'a-f')"
		entry="$IMG/efi-part/loader/entries/appliance-a.conf"
		if [ "$names" != "esp appliance-root-a appliance-root-b appliance-state " ]; then
			fail "post-image: partitions are '$names'"
		elif ! grep -q "root=PARTUUID=$root_a " "$entry"; then
			cat "$entry"
			fail "post-image: the loader entry does not boot appliance-root-a ($root_a)"
		elif [ -e "$IMG/efi-part/loader/entries/buildroot.conf" ]; then
			fail "post-image: the generic buildroot.conf entry is still there"
		else
			pass "post-image: GPT esp, appliance-root-{a,b}, appliance-state; entry boots slot A"
		fi
	fi
fi

# 7 ---------------------------------------------------------------------
step "7. make applianced-rsync (the package's copy of the sources)"
SRC="$OUT/build/applianced-$MK_VERSION"
if [ ! -f "$OUT/.config" ]; then
	fail "source copy: no .config (check 1 failed)"
elif ! brmake applianced-rsync > "$WORK/rsync.log" 2>&1; then
	tail -n 20 "$WORK/rsync.log"
	fail "source copy: make applianced-rsync failed"
else
	ok=1
	echo "copied: $(du -sh "$SRC" | cut -f1) in $(cd "$SRC" && echo ./*)"
	for f in Cargo.toml Cargo.lock appliance/daemon/config/appliance.toml \
		systemd/applianced.service systemd/appliance.sysusers.conf \
		systemd/appliance.tmpfiles.conf; do
		if [ ! -f "$SRC/$f" ]; then
			echo "error: $f is not in the copy"
			ok=0
		fi
	done
	# Every workspace member must be in the copy, or cargo cannot load the
	# workspace. Reading the manifests compiles nothing.
	if ! command -v cargo > /dev/null; then
		echo "cargo not installed: the workspace manifests were not read"
	elif ! (cd "$SRC" && cargo metadata --no-deps --offline --format-version 1) \
		> "$WORK/metadata.json" 2> "$WORK/metadata.err"; then
		cat "$WORK/metadata.err"
		ok=0
	elif ! python3 - "$WORK/metadata.json" <<'EOF'
import json
import sys

with open(sys.argv[1]) as f:
    packages = json.load(f)["packages"]
bins = {t["name"] for p in packages for t in p["targets"] if "bin" in t["kind"]}
print("workspace members: %s" % ", ".join(p["name"] for p in packages))
print("binaries: %s" % ", ".join(sorted(bins)))
missing = {"applianced", "appliancectl"} - bins
for name in sorted(missing):
    print("error: no binary %s in the workspace" % name)
sys.exit(1 if missing else 0)
EOF
	then
		ok=0
	fi
	if [ "$ok" = 1 ]; then
		pass "source copy: workspace complete, installed files present"
	else
		fail "source copy: see errors above"
	fi
fi

# -----------------------------------------------------------------------
printf '\n=== Summary (Buildroot %s)\n' "$BR_VERSION"
printf '%s\n' "${RESULTS[@]}"
if [ "$FAILED" = 0 ]; then
	echo "all checks passed"
else
	echo "some checks FAILED"
fi
exit "$FAILED"
