################################################################################
#
# applianced
#
################################################################################

# Keep in step with [workspace.package] version in the top-level Cargo.toml
# (check.sh compares them).
APPLIANCED_VERSION = 0.1.0
APPLIANCED_SITE = $(BR2_EXTERNAL_APPLIANCE_PATH)/..
APPLIANCED_SITE_METHOD = local
APPLIANCED_LICENSE = Apache-2.0

# Only what the build reads is copied into the build directory: the
# workspace manifests, the folders of its members (appliance/, hw-tests/),
# and the folders the files installed below come from. Whatever git
# ignores (target/, build outputs, fuzzing corpora) stays out, and so do
# the crates' fuzzing trees, which are not workspace members.
APPLIANCED_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--filter=':- .gitignore' \
	--exclude='target/' \
	--exclude='/appliance/*/fuzz/' \
	--include='/Cargo.toml' \
	--include='/Cargo.lock' \
	--include='/appliance/***' \
	--include='/hw-tests/***' \
	--include='/systemd/***' \
	--include='/udev/***' \
	--exclude='*'

# A local source is rsynced, not downloaded, so the cargo download
# post-processing that vendors the crates never runs for it. Vendor them
# here the same way, into the build directory. Crates come from the cache
# in BR_CARGO_HOME (in DL_DIR) when it holds them all, from crates.io
# otherwise. The build itself then runs with --offline --locked.
define APPLIANCED_CARGO_VENDOR
	mkdir -p $(BR_CARGO_HOME) $(@D)/.cargo
	cd $(@D) && $(HOST_MAKE_ENV) CARGO_HOME=$(BR_CARGO_HOME) \
		flock $(BR_CARGO_HOME)/.br-lock sh -c \
		'cargo vendor --offline --locked VENDOR 2>/dev/null || \
			cargo vendor --locked VENDOR' \
		> $(@D)/.cargo/config.toml.new
	mv $(@D)/.cargo/config.toml.new $(@D)/.cargo/config.toml
endef
APPLIANCED_PRE_BUILD_HOOKS += APPLIANCED_CARGO_VENDOR

# The top-level Cargo.toml is a virtual workspace manifest, so the cargo
# infrastructure's "cargo install --path ./" cannot be used: build the
# binary crates by name and install their outputs below.
#
# appliance-sync is the laptops' client; the firmware does not ship it (the
# sync server runs inside applianced). To put the client on the box too,
# add "--package appliance-sync" here and "appliance-sync" to
# APPLIANCED_BINS.
APPLIANCED_CARGO_BUILD_OPTS = \
	--package applianced \
	--package appliancectl

APPLIANCED_BINS = applianced appliancectl

APPLIANCED_BIN_DIR = \
	$(@D)/target/$(RUSTC_TARGET_NAME)/$(if $(BR2_ENABLE_DEBUG),debug,release)

# The udev rules are whatever udev/*.rules exist in the repository.
define APPLIANCED_INSTALL_TARGET_CMDS
	for bin in $(APPLIANCED_BINS); do \
		$(INSTALL) -D -m 0755 $(APPLIANCED_BIN_DIR)/$$bin \
			$(TARGET_DIR)/usr/bin/$$bin || exit 1; \
	done
	$(INSTALL) -D -m 0644 $(@D)/appliance/daemon/config/appliance.toml \
		$(TARGET_DIR)/etc/appliance/appliance.toml
	for f in $(@D)/udev/*.rules; do \
		[ -e "$$f" ] || continue; \
		$(INSTALL) -D -m 0644 "$$f" \
			$(TARGET_DIR)/usr/lib/udev/rules.d/$${f##*/} || exit 1; \
	done
endef

define APPLIANCED_INSTALL_INIT_SYSTEMD
	for f in $(@D)/systemd/*.service $(@D)/systemd/*.socket \
		$(@D)/systemd/*.timer $(@D)/systemd/*.target \
		$(@D)/systemd/*.path; do \
		[ -e "$$f" ] || continue; \
		$(INSTALL) -D -m 0644 "$$f" \
			$(TARGET_DIR)/usr/lib/systemd/system/$${f##*/} || exit 1; \
	done
	$(INSTALL) -D -m 0644 $(@D)/systemd/appliance.sysusers.conf \
		$(TARGET_DIR)/usr/lib/sysusers.d/appliance.conf
	$(INSTALL) -D -m 0644 $(@D)/systemd/appliance.tmpfiles.conf \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/appliance.conf
endef

# The same users and groups as systemd/appliance.sysusers.conf, created at
# build time too, so that the tmpfiles.d entries (applied while the root
# filesystem is assembled) can name the appliance group. systemd-sysusers
# finds them present at boot and leaves them alone.
define APPLIANCED_USERS
	appliance -1 appliance -1 * /var/lib/appliance - disk Storage appliance daemon
	- - appliance-admin -1 * - - - Appliance administrators
endef

$(eval $(cargo-package))
