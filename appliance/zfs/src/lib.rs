//! appliance-zfs: the only code in the appliance that runs `zpool`/`zfs`.
//!
//! # Layers
//!
//! * [`model`]: plain serde types — [`PoolStatus`] (state, vdev tree, scan),
//!   [`Pool`] (capacity), [`Properties`], [`Dataset`]. Unknown ZFS words
//!   are kept as `Other(..)` values, never rejected.
//! * [`mod@redundancy`]: pure margin arithmetic — failures tolerated by design,
//!   failed slots, margin (minimum over data vdevs, negative when a vdev is
//!   lost) and the summary "RAID-Z2, 6 disks, 1 failed, survives 1 more".
//! * [`parse`]: pure parsers for OpenZFS 2.3 JSON (`-j --json-int`), the
//!   2.1 text forms (`status -p`, `-Hp`), and `zpool events`, including an
//!   incremental [`parse::events::EventStreamParser`] for `zpool events -f`.
//!   All are tested on every capture in `../shared/zfs-samples` (copied to
//!   `tests/fixtures/`).
//! * [`api`]: the [`Zfs`] trait and validated specs ([`PoolSpec`],
//!   [`DatasetSpec`]). It is an `async_trait`, so `Arc<dyn Zfs>` works;
//!   the storage manager should hold an `Arc<dyn Zfs>`.
//! * [`runner`]: [`ZfsRunner`], the real implementation (absolute binary
//!   paths checked at start-up, JSON by default, a timeout on every call,
//!   process-group kill on timeout, stderr classified into [`FailureKind`]).
//! * [`fake`]: [`fake::FakeZfs`], the one shared in-memory implementation for
//!   tests above this crate (disks can be pulled, faulted and returned,
//!   scans advanced, pools hung).
//!
//! # Invariants
//!
//! * No call blocks the caller beyond its timeout. A command stuck in D
//!   state on a suspended pool is SIGKILLed (it may linger; nobody waits
//!   for it) and the caller gets [`ZfsError::Timeout`].
//! * Every argument that reaches argv is validated first (pool/dataset
//!   names, absolute device paths, `key=value` properties), so nothing can
//!   be read as an option. No shell is involved.
//! * Every parser bounds its input ([`parse::MAX_OUTPUT_BYTES`], vdev depth,
//!   event line length and field count) and never panics.
//!
//! # Why not libzetta
//!
//! The design card named libzetta (Inner-Heaven/libzetta-rs). Checked here
//! against its sources (release `v0.5.0`, tag commit `eafdea0`, May 2023,
//! the version on crates.io; and `master` at `f0c5dbd`, March 2025):
//!
//! * `src/parsers/stdout.pest` in v0.5.0 has
//!   `state_enum = { "ONLINE" | "OFFLINE" | "UNAVAIL" | "DEGRADED" |
//!   "FAULTED" | "AVAIL" | "INUSE" }` — no `REMOVED`, the state a pulled
//!   disk has in every `removed*` capture. Master added it (#264), plus
//!   `special` vdevs (#268), but no release carries them, and neither
//!   version knows `SUSPENDED` (the pool state in `removed3`) or dRAID.
//! * `ZpoolOpen3::status()` (`src/zpool/open3.rs`) calls
//!   `.expect("Failed to unwrap zpool from status check")` on the parse
//!   result, so unknown output panics the daemon instead of returning an
//!   error — exactly on the bad days this appliance exists for.
//! * `src/zfs/open3.rs` parses properties with 87
//!   `value.parse().expect(FAILED_TO_PARSE)` calls, and its `Compression`
//!   enum (`src/zfs/properties.rs`) has no `zstd`, our documents dataset's
//!   compression.
//! * The `ZfsEngine` trait (`src/zfs/mod.rs`) has create/destroy/list/
//!   read_properties/snapshot/send but no way to set a property after
//!   creation (quotas). There is no scan progress and no `zpool events`.
//! * It depends on `libzetta-zfs-core-sys` unconditionally (no feature to
//!   turn the libzfs_core link off), tying the build to the C library's
//!   version on the build host.
//!
//! Decision: own the small command layer here, on OpenZFS 2.3's JSON with
//! typed errors; do not depend on libzetta. Its lzc bindings (snapshots,
//! send) could be reconsidered behind an optional cargo feature if the
//! appliance ever needs `zfs send`; the default build links no libzfs.
//!
//! # Constants
//!
//! Timeouts (30 s queries, 120 s changes) are in [`RunnerConfig`]; output
//! and parser limits are documented where defined
//! ([`parse::MAX_OUTPUT_BYTES`], [`parse::events::MAX_LINE_BYTES`],
//! [`api::EVENT_CHANNEL_CAPACITY`]).
//!
//! # Known ZFS quirks handled
//!
//! * 2.3.2's `zpool get -j --json-int` prints the `guid` property clamped
//!   to `i64::MAX`; the pool GUID is taken from `pool_guid`.
//! * `--json-flat-vdevs` nodes also carry partial nested `vdevs`; the tree
//!   is rebuilt from `parent` links only.
//! * `zpool status -p` still prints human sizes on the `scan:` line.
//! * ZED did not degrade a disk with checksum errors (issue 8), so
//!   [`PoolStatus::devices_with_errors`] reports error counters directly.

pub mod api;
pub mod error;
pub mod fake;
pub mod model;
pub mod parse;
pub mod redundancy;
pub mod runner;

pub use api::{
    DatasetSpec, EncryptionSpec, EventFollower, KeyFormat, PoolLayout, PoolSpec, ScrubAction, Zfs,
};
pub use error::{FailureKind, ZfsError};
pub use model::*;
pub use parse::events::{EventItem, ZpoolEvent};
pub use redundancy::{redundancy, Layout, Redundancy, RedundancyLevel, VdevRedundancy};
pub use runner::{OutputFormat, RunnerConfig, ZfsRunner};
