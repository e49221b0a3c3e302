//! # appliance-record-log
//!
//! An append-only, segmented record log with a CRC per record, an fsync
//! policy, crash recovery, retention and crash-safe compaction. The bus keeps
//! its durable subjects in one; the cache keeps its persistence in another.
//!
//! The API is synchronous (`std::fs`): async callers run it on a blocking
//! thread (`tokio::task::spawn_blocking`, or a dedicated writer thread that
//! owns the [`Log`]).
//!
//! ## Using it
//! ```no_run
//! use appliance_record_log::{FsyncPolicy, Log, LogOptions};
//! # fn main() -> Result<(), appliance_record_log::Error> {
//! let opts = LogOptions { fsync: FsyncPolicy::Always, ..LogOptions::default() };
//! let (mut log, report) = Log::open("/var/lib/appliance/cache-log", opts)?;
//! if !report.is_clean() {
//!     eprintln!("lost {} bytes, at least {} records", report.bytes_lost(), report.records_lost_at_least());
//! }
//! let at = log.append(b"payload")?;          // durable when this returns (Always)
//! for rec in log.read_from_seq(at.seq)? {     // or read_since(ts_ms), or iter()
//!     let rec = rec?;
//!     assert_eq!(rec.payload, b"payload");
//! }
//! # Ok(()) }
//! ```
//!
//! ## Layout
//! ```text
//! DIR/LOCK                       flock(2)ed while a Log is open: one writer
//! DIR/gen-000001/                the current generation (one per compaction)
//!     00000000000000000001.seg   segments, named by the lowest sequence they may hold
//!     00000000000000004711.seg   the last one is the active segment
//!     next-segment.spare         zeros for the next segment (`LogOptions::preallocate`)
//! DIR/gen-000002.tmp/            a compaction being built (never read)
//! DIR/damaged/                   bytes cut off by recovery, kept for inspection
//! ```
//! Each segment starts with the 8-byte magic `APLRLOG1`, then frames:
//! `len:u32le crc:u32le seq:u64le ts_ms:u64le payload`, where
//! `len = 16 + payload length` and `crc = crc32c(len bytes ++ seq ++ ts ++ payload)`.
//! Integers are fixed-width little-endian, so the header needs no
//! serialisation library; payloads are opaque (the bus and the cache put
//! postcard in them). Zero bytes after a segment's last frame are unused
//! space, cut off unreported, in the active segment of a log that
//! preallocates (`LogOptions::preallocate`) and in a sealed segment whose
//! last frame reaches the next segment's name; other zero tails are
//! reported (`DamageReason::ZeroFilled`: blocks a crash left unwritten).
//!
//! Sequence numbers start at 1 and increase by one per append. They never
//! repeat, even after damage: recovery continues past the highest number it
//! saw on disk, including numbers in frames it could not load. Compaction
//! and damage leave gaps.
//!
//! ## Durability
//! * [`FsyncPolicy::Always`]: `append` returns after `fdatasync(2)`. An
//!   acknowledged record survives power loss.
//! * [`FsyncPolicy::Interval`]: `append` returns once `write(2)` is done (it
//!   survives the process being killed). The caller calls
//!   [`Log::sync_if_due`] on a timer (see [`Log::sync_due_in`]) or
//!   [`Log::sync`] when it wants a barrier.
//! * Sealing a segment (rotation) always fsyncs it, and creating a segment
//!   fsyncs the directory, so only the active segment is ever unsynced.
//!   With [`LogOptions::defer_writes`] (for a group-commit writer that
//!   acknowledges only after a [`PendingSync`] covering the record ran),
//!   appends stay in memory until the next `PendingSync` (or [`Log::sync`])
//!   writes them, in append order whichever thread runs it, and rotation
//!   leaves the old segment's sealing to it as well.
//! * A failed write is cut back off the file, so a later append never lands
//!   behind a partial frame. A failed `fdatasync` *poisons* the log: the
//!   kernel may have dropped the dirty pages, so a retry could report success
//!   for data that is gone. Every later write returns [`Error::Poisoned`]
//!   until the log is reopened (which runs recovery).
//!
//! ## Recovery (on open)
//! Every segment is scanned, frame by frame. A frame is good when its length
//! is possible, it fits in the file, its CRC matches, and its sequence number
//! is above the previous one. At the first bad frame the scan stops:
//! * everything before it is loaded;
//! * the rest of that segment is cut off (`ftruncate` + fsync), after its
//!   bytes are copied to `DIR/damaged/` unless they were all zeros;
//! * the rest of the segment is then searched for frames that still verify
//!   (with a plausible sequence number), only to report the loss precisely:
//!   they are **not** loaded, since nothing proves the bytes between are
//!   harmless. If such frames exist the damage is [`DamageKind::Corrupt`],
//!   otherwise it is a [`DamageKind::TornTail`] (an interrupted write).
//! * later segments are still loaded: damage in one segment costs only the
//!   rest of that segment.
//!
//! [`RecoveryReport`] lists each [`Damage`]: segment, offset, reason, bytes cut,
//! a lower bound on the records lost and, where known, the sequence numbers
//! that can no longer be read (up to the next segment's first number for a
//! sealed segment). The report is also logged through `tracing` at `warn`.
//!
//! ## Retention
//! [`Retention`] drops whole segments, oldest first, while the log is over
//! `max_total_bytes` or the oldest segment's newest record is older than
//! `max_age`. It runs on open, on every rotation, and when the caller calls
//! [`Log::enforce_retention`]. The active segment is never dropped, so the
//! log can exceed `max_total_bytes` by up to one segment.
//!
//! ## Reading
//! [`Log::iter`], [`Log::read_from_seq`] and [`Log::read_since`] return a
//! [`LogIter`] over a snapshot. It opens its segment files at creation, so it
//! needs no lock afterwards, and retention or compaction deleting the files
//! does not disturb it. Seeking by sequence uses a sparse in-memory index
//! (one entry per 64 KiB of a segment).
//!
//! ## Compaction
//! For stores whose records are idempotent assignments (the cache: put with
//! the full value, delete). [`Log::begin_compaction`] seals the active segment
//! (everything so far is below the *boundary*), creates `gen-<N+1>.tmp`, and
//! returns a [`Compaction`] plus the records it replaces. The caller pushes the
//! records to keep (usually straight from that iterator, keeping their
//! numbers), appending to the log meanwhile if it likes. Then
//! [`Log::finish_compaction`]:
//! 1. fsyncs the compacted segments (each as it is completed);
//! 2. hard-links the segments at or above the boundary into the new
//!    directory (same inodes: the open active segment stays valid);
//! 3. fsyncs the new directory, `rename(2)`s `gen-<N+1>.tmp` to `gen-<N+1>`,
//!    fsyncs `DIR`;
//! 4. removes `gen-<N>`.
//!
//! **Invariant:** `DIR` always holds a complete generation, and `open` uses the
//! highest-numbered `gen-<N>` without `.tmp`, deleting every other generation
//! directory. A generation becomes visible only through the single rename in
//! step 3, after its files and directory entries are durable. So a crash
//! before the rename is durable leaves the old generation (the compaction is
//! lost, no record is), and a crash after it leaves the new one, complete; a
//! half-deleted old generation is simply finished off. [`Compaction::push`]
//! refuses records at or above the boundary and out-of-order numbers, so the
//! new generation is ordered like the old.
//!
//! [`Log::compact_retain`] does all of it in one call with a predicate.

mod compact;
mod deferred;
mod error;
mod frame;
mod log;
mod read;

pub use compact::{Compaction, CompactionReport, Superseded};
pub use error::{Error, Result};
pub use frame::{DamageReason, FORMAT_MAX_PAYLOAD};
pub use log::{
    now_ms, Appended, Damage, DamageKind, FsyncPolicy, Log, LogOptions, LogStats, LostRecords,
    PendingSync, RecoveryReport, Retention, RetentionReport, SpareJob, MAX_UNWRITTEN,
};
pub use read::{LogIter, Record};

#[cfg(test)]
mod tests;
