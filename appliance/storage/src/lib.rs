//! appliance-storage: the storage manager.
//!
//! It knows at every moment whether the data is safe and how many more
//! disks may fail, turns every pool and disk change into one `storage.*`
//! event, provisions pools, enforces and reports quotas, and schedules
//! scrubs. All ZFS access goes through `appliance-zfs`'s [`appliance_zfs::Zfs`]
//! trait (the real runner in production, `appliance_zfs::fake::FakeZfs` in
//! tests).
//!
//! # Layers
//! Pure policies (explicit `now`, no IO, unit-tested on the QEMU captures):
//! * [`quota`]: threshold latches, one event per upward crossing, 3 points
//!   of hysteresis (reasons there);
//! * [`scrub`]: the scheduler (threshold days since the last completion,
//!   time window, never during a resilver, persisted completion and intent);
//! * [`report`]: the storage report and the healthy/degraded/critical/
//!   unavailable rules;
//! * [`mod@derive`]: events from polls and `zpool events`, deduplicated by
//!   state, stale replays ignored, progress rate-limited;
//! * [`disks`]: eligibility for create-pool/replace over a snapshot of the
//!   machine's block devices; parsers for lsblk, wipefs, `/proc/mounts`, the
//!   udev database;
//! * [`breaker`]: circuit breaker and retry/backoff state machines;
//! * [`udev`]: udev netlink message parsing and tag filtering.
//!
//! Thin IO around them:
//! * [`provision`]: create-pool with intent persisted before each step
//!   ([`statefile`]: write temp, fsync, rename, fsync dir);
//! * [`manager`]: the tokio actor and its [`StorageManager`] handle;
//! * [`disks::SystemDisks`], [`udev::UdevMonitor`]: the real adapters.
//!
//! # Invariants
//! * The actor never awaits ZFS. Every call runs in its own task under a
//!   timeout; a hung pool makes the component `failed` with the reason while
//!   report, quota get and admission keep answering from the last poll.
//! * A change is published once, whichever source (event follower, poll,
//!   udev) saw it first; a restart republishes the current pool state and
//!   failed disks once (`old_state: null`), so a subscriber that joined late
//!   still learns them.
//! * Every published resilver `started` is followed by its `finished`: also
//!   when it ends while the manager is down (published at start, from the
//!   mark persisted with the scrub book before the `started` went out; a
//!   resilver newer than the last end known is published too), and when a
//!   scrub replaces its scan stats before any poll shows its end (published
//!   from the last poll that showed it running). Likewise a scrub whose
//!   `progress` went out is followed by its `finished` across a restart,
//!   its first one included, or by its `canceled` (also when ZFS restarts
//!   it as a resilver: published before the resilver's `started`). A
//!   closing mark (and a scrub's completion) is persisted after its
//!   `finished` goes out, so a crash repeats an event rather than losing
//!   one. A resilver still running after a restart (or the pool's return)
//!   gets its `progress`, not a second `started`.
//! * Intent before action: pool creation, scheduled scrubs and scrub
//!   completions are on disk before (or as) they happen; restarts complete
//!   or report, never repeat blindly.
//! * Nothing reads a disk outside `/dev/disk/by-id`, the boot disk is never
//!   offered, and signatures are only overwritten with `force`.
//!
//! # Events
//! | subject | when |
//! |---|---|
//! | `storage.pool.<pool>.state` | state word or margin changed (`UNRESPONSIVE` when ZFS stops answering, `ABSENT` when exported) |
//! | `storage.pool.<pool>.healthy` | every 15 min while healthy |
//! | `storage.disk.<id>.removed\|added\|faulted\|online` | vdev state changes; udev add/remove of tagged disks (pool members' removals come from ZFS only) |
//! | `storage.disk.<id>.errors` | read/write/checksum counters rose (ZED does not degrade a disk for repaired checksum errors) |
//! | `storage.scrub.<pool>.progress\|paused\|canceled\|finished` | finished carries bytes repaired, errors and per-disk counters |
//! | `storage.resilver.<pool>.started\|progress\|finished` | |
//! | `storage.quota.<dataset>` | a level crossed upward, or cleared |
//!
//! Names are escaped for subjects with
//! [`appliance_types::storage::subject_token`] (`.`, `*`, `>`, whitespace).
//! Payloads are the structs in [`appliance_types::storage`];
//! [`subject_and_payload`] gives the JSON the bus carries.
//!
//! # Constants
//! Each is explained where it is defined: poll 10 s, query timeout 45 s,
//! change timeout 150 s (above the runner's own 30/120 s), breaker 3
//! failures / 10 s–5 min, retries 2 at 200 ms doubling, progress events ≥ 10
//! s and ≥ 1 point apart but at least every 5 min, error events per disk ≥
//! 60 s apart, heartbeat 15 min, scrub threshold 35 days, request grace 10
//! min, quota levels 80/90/95 % with 3 points of hysteresis, minimum disk 64
//! MiB, RAID-Z*N* ≥ *N* + 2 disks.
//!
//! # Test tiers
//! Unit (pure modules, captures in `tests/fixtures/`), fake-backed
//! (`tests/manager.rs`, `tests/provision.rs`: paused tokio time, `FakeZfs`,
//! a wrapper whose calls hang for real), and real ZFS in QEMU (`hw-tests/`,
//! issue 8).

pub mod breaker;
pub mod clock;
pub mod datasets;
pub mod derive;
pub mod disks;
pub mod error;
pub mod manager;
pub mod provision;
pub mod quota;
pub mod report;
pub mod scrub;
pub mod sink;
pub mod statefile;
pub mod udev;

pub use clock::{Clock, SystemClock, TokioClock};
pub use error::StorageError;
pub use manager::{Health, ManagerConfig, StorageManager};
pub use sink::{subject_and_payload, CollectingSink, EventSink};
