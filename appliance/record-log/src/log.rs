//! The writer: open and recovery, append, rotation, fsync, retention, readers.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use crate::deferred::{Ticket, WriteFailed, WriteQueue};
use crate::error::{io_err, Error, Result};
use crate::frame::{
    encode_frame, frame_size, scan_segment, DamageReason, FORMAT_MAX_PAYLOAD, INDEX_STRIDE,
    SEGMENT_HEADER_LEN, SEGMENT_MAGIC,
};
use crate::read::{LogIter, SegmentCursor};

/// When appends reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// `append` returns only after `fdatasync` of the segment: an acknowledged
    /// record survives a crash or power loss.
    Always,
    /// `append` returns once the record is in the kernel (it survives a crash
    /// of the process, not of the machine). The caller drives
    /// [`Log::sync_if_due`] (e.g. from a timer at [`Log::sync_due_in`]) so that
    /// no more than this much time's worth of records is at risk.
    Interval(Duration),
}

/// Which whole segments to drop, oldest first. The active segment is never
/// dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Drop a segment once its newest record is older than this.
    pub max_age: Option<Duration>,
    /// Drop the oldest segments while the log is larger than this.
    pub max_total_bytes: Option<u64>,
}

/// Options for [`Log::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A new segment is started when the next record would take the active
    /// one past this size (a record larger than this gets a segment of its
    /// own). Default 64 MiB: large enough that the per-segment fsync of the
    /// directory is rare, small enough that retention frees space in
    /// reasonable steps and recovery reads one segment at a time.
    pub segment_max_bytes: u64,
    /// See [`FsyncPolicy`]. Default `Interval(100 ms)`.
    pub fsync: FsyncPolicy,
    /// See [`Retention`]. Default: keep everything.
    pub retention: Retention,
    /// Largest payload accepted by `append`. Default 16 MiB; at most
    /// [`FORMAT_MAX_PAYLOAD`].
    pub max_payload_bytes: u32,
    /// Deferred writes (default off): `append` only encodes its frames into
    /// memory, and they are written by the [`PendingSync`] that
    /// [`Log::take_pending_sync`] hands out, just before its `fdatasync`
    /// (or by [`Log::sync`], compaction, closing, or once [`MAX_UNWRITTEN`]
    /// bytes are owed). Rotation then does no IO beyond creating the next
    /// segment: sealing the old one (its last bytes and `fdatasync`) and the
    /// directory's fsync are the next `PendingSync`'s first steps, done
    /// before any byte of the newer segment is written, so a crash leaves a
    /// prefix of the log.
    ///
    /// Whichever thread runs them, the handed-out batches are written in
    /// append order, and a `PendingSync` (or `sync`) returns only once every
    /// one taken before it has finished its fsyncs too.
    ///
    /// For a writer that acknowledges only after a `PendingSync` covering
    /// the record has run, as a group commit does: the appending thread does
    /// not enter the kernel for the log (a `write(2)` can wait for a journal
    /// commit), except to create a segment or to write once `MAX_UNWRITTEN`
    /// is owed, and each `fdatasync` flushes exactly the bytes it
    /// acknowledges rather than also the appends racing with it. The costs:
    /// a record is not in the kernel when `append` returns (a crash of the
    /// process loses it, so `FsyncPolicy::Interval` callers should leave
    /// this off); readers see only written records; and a failed write
    /// poisons the log until it is reopened (the frames after it are already
    /// numbered), where an immediate write is cut back and only that append
    /// fails.
    pub defer_writes: bool,
    /// Preallocated segments (default off; only with `defer_writes`, for a
    /// writer that acknowledges a record only once a [`PendingSync`]
    /// covering it has run, as a group commit does: zeros after the active
    /// segment's last records are taken for unused space, so a record
    /// acknowledged before its bytes were written could vanish unreported): a
    /// rotation starts the next segment in a file of `segment_max_bytes`
    /// zeros written and fsynced beforehand by a [`SpareJob`] (see
    /// [`Log::spare_job`]), when one is ready; else in a new empty file as
    /// without this option.
    ///
    /// Appending to a file changes its size, so each `fdatasync` also
    /// writes the inode (ext4 without a journal: a second synchronous
    /// write; with one: a journal commit). Overwriting blocks that are
    /// already allocated and written needs neither: on this project's test
    /// machine an `fdatasync` of a few KiB took 0.15 ms instead of 0.35 ms.
    /// The cost is writing each segment's bytes twice, the zeros ahead of
    /// time, off the appenders' path. (`fallocate` is no substitute: its
    /// unwritten extents are converted on the first write, which is again
    /// a metadata change for the `fdatasync`.)
    pub preallocate: bool,
}

/// The file a [`SpareJob`] leaves ready in a generation directory (not a
/// segment name, so recovery ignores it; a leftover one is used after a
/// restart all the same).
pub(crate) const SPARE_NAME: &str = "next-segment.spare";
const SPARE_TMP_NAME: &str = "next-segment.spare.tmp";

/// With [`LogOptions::defer_writes`], at most this many bytes (8 MiB) wait
/// in memory: an append that leaves more owed writes them at once (without
/// `fdatasync`), so a writer that never syncs stays bounded.
pub const MAX_UNWRITTEN: usize = 8 << 20;

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_max_bytes: 64 << 20,
            fsync: FsyncPolicy::Interval(Duration::from_millis(100)),
            retention: Retention::default(),
            max_payload_bytes: 16 << 20,
            defer_writes: false,
            preallocate: false,
        }
    }
}

/// Where an appended record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence number.
    pub seq: u64,
    /// Its timestamp (unix ms).
    pub ts_ms: u64,
}

/// How many records a piece of damage cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRecords {
    /// Records known to be lost: frames after the damage that still verify,
    /// plus the damaged frame itself when its bytes are not all zero. A lower
    /// bound: a destroyed frame cannot always be counted.
    pub at_least: u64,
    /// Sequence numbers that can no longer be read, when known: from the one
    /// after the last good record to the one before the next segment (for a
    /// sealed segment) or to the highest verifiable one seen past the damage.
    /// After compaction, sequence numbers have gaps, so this range may include
    /// numbers that never existed.
    pub seqs: Option<RangeInclusive<u64>>,
}

/// Whether damage looks like an interrupted write or like corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// The damage runs to the end of the segment and nothing after it
    /// verifies: the usual result of a crash during a write.
    TornTail,
    /// Data that verifies follows the damage: bytes were changed in place.
    Corrupt,
}

/// Damage found and repaired while opening the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte offset where the first bad frame starts (0: bad segment header).
    pub offset: u64,
    /// Torn tail or corruption.
    pub kind: DamageKind,
    /// What exactly failed at `offset`.
    pub reason: DamageReason,
    /// Bytes cut off the segment (from `offset` to its old end).
    pub bytes_lost: u64,
    /// Records lost.
    pub lost: LostRecords,
    /// The last good record before the damage, if any in this segment.
    pub last_good_seq: Option<u64>,
    /// A copy of the cut bytes, kept for inspection (none when they were all zero).
    pub quarantined: Option<PathBuf>,
}

/// What [`Log::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// The generation opened (increases with each compaction).
    pub generation: u64,
    /// Segments in the log after recovery.
    pub segments: usize,
    /// Records readable after recovery.
    pub records_loaded: u64,
    /// Bytes of the log after recovery.
    pub bytes_loaded: u64,
    /// Lowest and highest readable sequence number.
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    pub last_seq: Option<u64>,
    /// The sequence number the next append gets. Never reuses a number seen
    /// on disk, even one past damage.
    pub next_seq: u64,
    /// Damage found, each repaired by truncating the segment at `offset`.
    pub damage: Vec<Damage>,
    /// Leftovers of interrupted compactions (and superseded generations)
    /// that were removed.
    pub removed_stale: Vec<PathBuf>,
    /// Segments dropped by retention while opening.
    pub retention: RetentionReport,
    /// Time taken.
    pub elapsed: Duration,
}

impl RecoveryReport {
    /// No damage was found.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
    /// Total bytes cut off damaged segments.
    pub fn bytes_lost(&self) -> u64 {
        self.damage.iter().map(|d| d.bytes_lost).sum()
    }
    /// Total of `LostRecords::at_least` over all damage.
    pub fn records_lost_at_least(&self) -> u64 {
        self.damage.iter().map(|d| d.lost.at_least).sum()
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionReport {
    /// Whole segments deleted.
    pub segments_removed: usize,
    /// Records in them.
    pub records_removed: u64,
    /// Bytes in them.
    pub bytes_removed: u64,
}

/// Summary numbers for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Segment files.
    pub segments: usize,
    /// Records readable.
    pub records: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Lowest readable sequence number.
    pub first_seq: Option<u64>,
    /// Highest readable sequence number.
    pub last_seq: Option<u64>,
    /// Next sequence number to be assigned.
    pub next_seq: u64,
    /// Whether appends since the last fsync are waiting for one.
    pub dirty: bool,
}

/// One segment file, as the writer tracks it.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// Sequence number in the file name: no record in it is below this.
    pub name_seq: u64,
    pub path: PathBuf,
    pub len: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub min_ts: Option<u64>,
    pub max_ts: Option<u64>,
    pub index: Vec<(u64, u64)>,
}

impl Segment {
    pub(crate) fn empty(name_seq: u64, path: PathBuf) -> Self {
        Self {
            name_seq,
            path,
            len: SEGMENT_HEADER_LEN,
            records: 0,
            first_seq: None,
            last_seq: None,
            min_ts: None,
            max_ts: None,
            index: Vec::new(),
        }
    }

    /// Accounts for a frame written at `offset`.
    pub(crate) fn note(&mut self, seq: u64, ts_ms: u64, offset: u64, size: u64) {
        if self
            .index
            .last()
            .is_none_or(|(_, o)| offset - o >= INDEX_STRIDE)
        {
            self.index.push((seq, offset));
        }
        self.records += 1;
        self.first_seq.get_or_insert(seq);
        self.last_seq = Some(seq);
        self.min_ts = Some(self.min_ts.map_or(ts_ms, |t| t.min(ts_ms)));
        self.max_ts = Some(self.max_ts.map_or(ts_ms, |t| t.max(ts_ms)));
        self.len = offset + size;
    }

    /// Offset to start reading at to find `seq`.
    fn seek_offset(&self, seq: u64) -> u64 {
        let i = self.index.partition_point(|(s, _)| *s <= seq);
        if i == 0 {
            SEGMENT_HEADER_LEN
        } else {
            self.index[i - 1].1
        }
    }
}

pub(crate) const SEGMENT_SUFFIX: &str = ".seg";

pub(crate) fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_SUFFIX}")
}

pub(crate) fn gen_dir_name(gen: u64) -> String {
    format!("gen-{gen:06}")
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", path))
}

/// Creates a segment file holding only the header, durably.
pub(crate) fn create_segment(dir: &Path, name_seq: u64) -> Result<(File, Segment)> {
    let path = dir.join(segment_file_name(name_seq));
    let mut f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_err("create segment", &path))?;
    f.write_all(&SEGMENT_MAGIC)
        .and_then(|()| f.sync_data())
        .map_err(io_err("write segment header", &path))?;
    sync_dir(dir)?;
    Ok((f, Segment::empty(name_seq, path)))
}

/// Current wall-clock time in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An fsync taken out of a [`Log`] by [`Log::take_pending_sync`]: the
/// active segment's `fdatasync` and, with [`LogOptions::defer_writes`], the
/// writes it covers plus the sealing of segments rotated out since the last
/// one.
#[derive(Debug)]
pub struct PendingSync {
    root: PathBuf,
    /// Oldest first; the active segment last.
    parts: Vec<Part>,
    /// A directory that gained a segment since its last fsync.
    dir: Option<(File, PathBuf)>,
    /// With deferred writes: when `parts`' bytes may be written.
    ticket: Option<Ticket>,
}

/// One segment's share of a [`PendingSync`].
#[derive(Debug)]
struct Part {
    file: File,
    path: PathBuf,
    /// Frames to write first (deferred writes only).
    bytes: Vec<u8>,
}

impl PendingSync {
    /// Writes the deferred bytes (after those of every `PendingSync` taken
    /// earlier), then `fdatasync`s each segment and fsyncs the directory.
    /// With deferred writes, run each taken `PendingSync` (dropping one
    /// unrun poisons the log), and do not read from the log on the thread
    /// that holds an unrun one: readers wait until handed-out bytes are
    /// written.
    pub fn run(mut self) -> Result<()> {
        let Some(mut ticket) = self.ticket.take() else {
            // Immediate writes: the bytes are in the file already.
            for p in &self.parts {
                p.file
                    .sync_data()
                    .map_err(io_err("fdatasync segment", &p.path))?;
            }
            return Ok(());
        };
        let root = &self.root;
        let poisoned = |reason| Error::Poisoned {
            path: root.clone(),
            reason,
        };
        let Some((active, sealed)) = self.parts.split_last() else {
            return Err(poisoned("a pending sync without its segment".into()));
        };
        let dir = self.dir.as_ref().map(|(d, p)| (d, p.as_path()));
        ticket
            .write_in_turn(|| write_phase(sealed, dir, (&active.file, &active.path, &active.bytes)))
            .map_err(|e| match e {
                WriteFailed::This(e) => e,
                WriteFailed::Earlier(reason) => poisoned(reason),
            })?;
        if let Err(e) = active.file.sync_data() {
            ticket.fail(format!("fdatasync failed: {e}"));
            return Err(Error::Io {
                op: "fdatasync segment",
                path: active.path.clone(),
                source: e,
            });
        }
        // Durable only once every `PendingSync` taken before this one is.
        ticket.settle().map_err(poisoned)
    }
}

/// Writing a spare segment file for [`LogOptions::preallocate`]: zeros,
/// `fdatasync`, then a rename to the name a rotation looks for (so a
/// rotation never takes a file whose zeros are not on the disk). A crash
/// midway leaves only the temporary file, which the next job truncates.
#[derive(Debug)]
pub struct SpareJob {
    tmp: PathBuf,
    ready: PathBuf,
    len: u64,
}

impl SpareJob {
    /// Size of the writes; `between` runs after each (to pace the job or
    /// to give way to other writers).
    pub const STEP: usize = 1 << 20;

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (a zero `segment_max_bytes`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the file. On failure the temporary file is removed.
    pub fn run(self, mut between: impl FnMut()) -> Result<()> {
        let result = (|| {
            let mut f =
                File::create(&self.tmp).map_err(io_err("create spare segment", &self.tmp))?;
            let zeros = vec![0u8; Self::STEP];
            let mut left = self.len;
            while left > 0 {
                let n = usize::try_from(left).map_or(Self::STEP, |l| l.min(Self::STEP));
                f.write_all(&zeros[..n])
                    .map_err(io_err("write spare segment", &self.tmp))?;
                left -= n as u64;
                between();
            }
            f.sync_data()
                .map_err(io_err("fdatasync spare segment", &self.tmp))?;
            fs::rename(&self.tmp, &self.ready).map_err(io_err("rename spare segment", &self.ready))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result
    }
}

/// The write phase of a deferred batch, run in its turn: each segment
/// rotated out gets its last bytes and its `fdatasync`, the directory that
/// gained a segment its fsync, and only then are the active segment's bytes
/// written. So a newer segment's records never reach the disk while an
/// older one's tail may not have: after a crash the log is a prefix.
fn write_phase(
    sealed: &[Part],
    dir: Option<(&File, &Path)>,
    (file, path, bytes): (&File, &Path, &[u8]),
) -> Result<()> {
    for p in sealed {
        if !p.bytes.is_empty() {
            (&p.file)
                .write_all(&p.bytes)
                .map_err(io_err("append to segment", &p.path))?;
        }
        p.file
            .sync_data()
            .map_err(io_err("fdatasync segment", &p.path))?;
    }
    if let Some((d, dir_path)) = dir {
        d.sync_all().map_err(io_err("fsync directory", dir_path))?;
    }
    if !bytes.is_empty() {
        let mut f = file;
        f.write_all(bytes)
            .map_err(io_err("append to segment", path))?;
    }
    Ok(())
}

/// With deferred writes: a segment rotated out whose last bytes or fsync
/// are still owed.
#[derive(Debug)]
struct Sealed {
    name_seq: u64,
    part: Part,
}

/// An append-only, segmented record log in one directory. See the crate docs.
#[derive(Debug)]
pub struct Log {
    pub(crate) root: PathBuf,
    pub(crate) gen: u64,
    pub(crate) gen_dir: PathBuf,
    pub(crate) opts: LogOptions,
    /// Sorted by `name_seq`; the last one is the active segment.
    pub(crate) segments: Vec<Segment>,
    pub(crate) active: File,
    pub(crate) next_seq: u64,
    dirty: bool,
    last_sync: Instant,
    poisoned: Option<String>,
    buf: Vec<u8>,
    /// Deferred writes: frames of the active segment not written yet.
    unwritten: Vec<u8>,
    /// Deferred writes: segments rotated out, not yet sealed, oldest first.
    sealed: Vec<Sealed>,
    /// Deferred writes: the generation directory, when a segment was created
    /// in it since its last fsync.
    pub(crate) dir_unsynced: Option<File>,
    /// Deferred writes: the order in which handed-out bytes are written.
    queue: Arc<WriteQueue>,
    /// Shared with the `Log` a [`Log::rebuild`] reopens in its place.
    pub(crate) lock: Arc<Flock<File>>,
    /// A spare segment is (believed) ready in the generation directory.
    pub(crate) spare_ready: bool,
    /// The active segment was a spare: its appends overwrite zeros.
    active_preallocated: bool,
    /// Frame bytes appended and `PendingSync`s handed out since the log
    /// was opened (see [`Log::sync_totals`]).
    appended_bytes: u64,
    pending_syncs: u64,
}

/// The log a segment is recovered for.
#[derive(Clone, Copy)]
struct Recovering<'a> {
    root: &'a Path,
    gen: u64,
    /// The log defers its writes (see `LogOptions::defer_writes`).
    deferred: bool,
    /// The log preallocates its segments: zeros after the last records of
    /// the active segment are its unused space.
    preallocated: bool,
}

/// Whether the segment file at `path` starts with the segment magic.
fn has_header(path: &Path) -> bool {
    let mut magic = [0u8; SEGMENT_MAGIC.len()];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| magic == SEGMENT_MAGIC)
}

/// Kinds of entries at the top of a log directory.
enum RootEntry {
    Gen(u64),
    TmpGen,
    Other,
}

fn classify_root_entry(name: &str) -> RootEntry {
    let Some(rest) = name.strip_prefix("gen-") else {
        return RootEntry::Other;
    };
    if let Some(num) = rest.strip_suffix(".tmp") {
        if num.parse::<u64>().is_ok() {
            return RootEntry::TmpGen;
        }
        return RootEntry::Other;
    }
    rest.parse().map_or(RootEntry::Other, RootEntry::Gen)
}

impl Log {
    /// Opens (creating if needed) the log in `dir`, recovering from whatever a
    /// crash left: see the crate docs for what is repaired and reported.
    /// Takes an exclusive lock on `dir/LOCK` for the life of the `Log`.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<(Self, RecoveryReport)> {
        let started = Instant::now();
        if opts.max_payload_bytes > FORMAT_MAX_PAYLOAD {
            return Err(Error::InvalidOptions(format!(
                "max_payload_bytes {} is above the format maximum {FORMAT_MAX_PAYLOAD}",
                opts.max_payload_bytes
            )));
        }
        if opts.segment_max_bytes <= SEGMENT_HEADER_LEN {
            return Err(Error::InvalidOptions(
                "segment_max_bytes is too small".into(),
            ));
        }
        let root = dir.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err("create log directory", &root))?;
        let lock_path = root.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| Error::Locked(root.clone()))?;
        Self::open_locked(root, opts, Arc::new(lock), started)
    }

    /// [`Log::open`] with the directory's lock already held.
    pub(crate) fn open_locked(
        root: PathBuf,
        opts: LogOptions,
        lock: Arc<Flock<File>>,
        started: Instant,
    ) -> Result<(Self, RecoveryReport)> {
        let mut report = RecoveryReport::default();
        let (gen, gen_dir) = Self::pick_generation(&root, &mut report)?;
        report.generation = gen;

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&gen_dir).map_err(io_err("list generation", &gen_dir))? {
            let entry = entry.map_err(io_err("list generation", &gen_dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = name
                .strip_suffix(SEGMENT_SUFFIX)
                .and_then(|s| s.parse().ok())
            {
                names.push((seq, entry.path()));
            }
        }
        names.sort();

        let mut segments = Vec::with_capacity(names.len());
        let mut seq_floor = 1u64;
        for (i, (name_seq, path)) in names.iter().enumerate() {
            let next_name = names.get(i + 1).map(|(s, _)| *s);
            // Whether the next segment's header reached the disk: with
            // deferred writes a sync writes and fsyncs a sealed segment's
            // last bytes before the next one's header, so without it none
            // of those last bytes was acknowledged.
            let next_written = names.get(i + 1).is_some_and(|(_, p)| has_header(p));
            let at = Recovering {
                root: &root,
                gen,
                deferred: opts.defer_writes,
                preallocated: opts.preallocate && opts.defer_writes,
            };
            let seg = Self::recover_segment(
                at,
                *name_seq,
                path,
                (next_name, next_written),
                &mut report,
                &mut seq_floor,
            )?;
            seq_floor = seq_floor.max(*name_seq);
            segments.push(seg);
        }
        let next_seq = seq_floor;
        let active = match segments.last() {
            Some(seg) => OpenOptions::new()
                .append(true)
                .open(&seg.path)
                .map_err(io_err("open active segment", &seg.path))?,
            None => {
                let (f, seg) = create_segment(&gen_dir, next_seq)?;
                segments.push(seg);
                f
            }
        };

        let mut log = Self {
            root,
            gen,
            gen_dir,
            opts,
            segments,
            active,
            next_seq,
            dirty: false,
            last_sync: Instant::now(),
            poisoned: None,
            buf: Vec::new(),
            unwritten: Vec::new(),
            sealed: Vec::new(),
            dir_unsynced: None,
            queue: Arc::default(),
            lock,
            spare_ready: false,
            active_preallocated: false,
            appended_bytes: 0,
            pending_syncs: 0,
        };
        // A spare left by the last run is used all the same, unless
        // preallocation is off now; a job's temporary file is a job a crash
        // interrupted.
        let _ = fs::remove_file(log.gen_dir.join(SPARE_TMP_NAME));
        let spare = log.gen_dir.join(SPARE_NAME);
        if log.opts.preallocate && log.opts.defer_writes {
            log.spare_ready = fs::symlink_metadata(&spare).is_ok();
        } else {
            let _ = fs::remove_file(&spare);
        }
        report.retention = log.enforce_retention()?;
        let stats = log.stats();
        report.segments = stats.segments;
        report.records_loaded = stats.records;
        report.bytes_loaded = stats.bytes;
        report.first_seq = stats.first_seq;
        report.last_seq = stats.last_seq;
        report.next_seq = log.next_seq;
        report.elapsed = started.elapsed();
        for d in &report.damage {
            tracing::warn!(
                segment = %d.segment.display(), offset = d.offset, kind = ?d.kind,
                reason = %d.reason, bytes_lost = d.bytes_lost, records_lost_at_least = d.lost.at_least,
                "record log: damage truncated"
            );
        }
        Ok((log, report))
    }

    /// Chooses the newest complete generation, removing temporary and older
    /// ones (see "Compaction" in the crate docs), or creates the first.
    fn pick_generation(root: &Path, report: &mut RecoveryReport) -> Result<(u64, PathBuf)> {
        let mut gens = Vec::new();
        let mut tmps = Vec::new();
        for entry in fs::read_dir(root).map_err(io_err("list log directory", root))? {
            let entry = entry.map_err(io_err("list log directory", root))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            match classify_root_entry(&name) {
                RootEntry::Gen(g) => gens.push((g, entry.path())),
                RootEntry::TmpGen => tmps.push(entry.path()),
                RootEntry::Other => {}
            }
        }
        gens.sort();
        let mut changed = false;
        let chosen = match gens.pop() {
            Some(g) => g,
            None => {
                let p = root.join(gen_dir_name(1));
                fs::create_dir(&p).map_err(io_err("create generation", &p))?;
                changed = true;
                (1, p)
            }
        };
        for p in tmps.into_iter().chain(gens.into_iter().map(|(_, p)| p)) {
            fs::remove_dir_all(&p).map_err(io_err("remove stale generation", &p))?;
            report.removed_stale.push(p);
            changed = true;
        }
        if changed {
            sync_dir(root)?;
        }
        Ok(chosen)
    }

    /// Scans one segment, truncates damage (quarantining the cut bytes), and
    /// returns what is left.
    fn recover_segment(
        at: Recovering<'_>,
        name_seq: u64,
        path: &Path,
        (next_name, next_written): (Option<u64>, bool),
        report: &mut RecoveryReport,
        seq_floor: &mut u64,
    ) -> Result<Segment> {
        let bytes = fs::read(path).map_err(io_err("read segment", path))?;
        let scan = scan_segment(&bytes, name_seq);
        if let Some(last) = scan.last_seq {
            *seq_floor = (*seq_floor).max(last + 1);
        }
        if let Some(d) = &scan.damage {
            let last_good_seq = scan.last_seq;
            let from = last_good_seq.map_or(name_seq, |s| s + 1);
            if let Some(r) = &d.seqs_after {
                *seq_floor = (*seq_floor).max(r.end() + 1);
            }
            let to = match (next_name, &d.seqs_after) {
                (Some(n), _) => n.checked_sub(1),
                (None, Some(r)) => Some(*r.end()),
                (None, None) => None,
            };
            // Zeros after a segment's records are unused space, not damage:
            // in a sealed segment whose records reach the next segment's
            // first number (nothing is missing); in the active segment of a
            // log that preallocates (its writer acknowledges a record only
            // once a sync wrote it, so none is in there); and, with
            // deferred writes, in a sealed segment whose next one has no
            // header (the sync that would have written its last records
            // never got that far). Other zeros are reported, as blocks
            // that held records and were lost.
            let missing = to.is_some_and(|t| t >= from);
            let unused_space = d.all_zero
                && match next_name {
                    Some(_) => !missing || (at.deferred && !next_written),
                    None => at.preallocated,
                };
            let start = usize::try_from(d.offset).unwrap_or(bytes.len());
            // In a log that preallocates, damage followed by zeros (a torn
            // frame in a spare) ends at its last byte that is not zero: the
            // spare's zeros are neither kept nor counted.
            let end = if d.all_zero || !at.preallocated {
                bytes.len()
            } else {
                bytes
                    .iter()
                    .rposition(|b| *b != 0)
                    .map_or(start, |p| (p + 1).max(start))
            };
            let cut = &bytes[start..end];
            if !unused_space {
                let quarantined = if d.all_zero {
                    None
                } else {
                    Some(Self::quarantine(at.root, at.gen, path, d.offset, cut)?)
                };
                report.damage.push(Damage {
                    segment: path.to_path_buf(),
                    offset: d.offset,
                    kind: if d.is_torn_tail() {
                        DamageKind::TornTail
                    } else {
                        DamageKind::Corrupt
                    },
                    reason: d.reason,
                    bytes_lost: cut.len() as u64,
                    lost: LostRecords {
                        at_least: d.verifiable_after + u64::from(!d.all_zero && d.offset > 0),
                        seqs: to.filter(|t| *t >= from).map(|t| from..=t),
                    },
                    last_good_seq,
                    quarantined,
                });
            }
            let mut f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err("open damaged segment", path))?;
            if scan.valid_len < SEGMENT_HEADER_LEN {
                f.set_len(0)
                    .and_then(|()| f.write_all(&SEGMENT_MAGIC))
                    .map_err(io_err("rewrite segment header", path))?;
            } else {
                f.set_len(scan.valid_len)
                    .map_err(io_err("truncate damaged segment", path))?;
            }
            f.sync_all()
                .map_err(io_err("fsync repaired segment", path))?;
        } else if bytes.is_empty() {
            // Created but the header never reached the disk.
            let mut f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err("open empty segment", path))?;
            f.write_all(&SEGMENT_MAGIC)
                .and_then(|()| f.sync_all())
                .map_err(io_err("rewrite segment header", path))?;
        }
        Ok(Segment {
            name_seq,
            path: path.to_path_buf(),
            len: scan.valid_len.max(SEGMENT_HEADER_LEN),
            records: scan.records,
            first_seq: scan.first_seq,
            last_seq: scan.last_seq,
            min_ts: scan.min_ts,
            max_ts: scan.max_ts,
            index: scan.index,
        })
    }

    fn quarantine(root: &Path, gen: u64, seg: &Path, offset: u64, bytes: &[u8]) -> Result<PathBuf> {
        let dir = root.join("damaged");
        fs::create_dir_all(&dir).map_err(io_err("create quarantine directory", &dir))?;
        let seg_name = seg
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("segment");
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!("{}-{seg_name}@{offset}.{n}.bin", gen_dir_name(gen)));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let mut f = File::create(&path).map_err(io_err("create quarantine file", &path))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write quarantine file", &path))?;
        sync_dir(&dir)?;
        Ok(path)
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The options it was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.opts
    }

    /// The sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Lowest readable sequence number.
    pub fn first_seq(&self) -> Option<u64> {
        self.segments.iter().find_map(|s| s.first_seq)
    }

    /// Highest readable sequence number.
    pub fn last_seq(&self) -> Option<u64> {
        self.segments.iter().rev().find_map(|s| s.last_seq)
    }

    /// Numbers for metrics.
    pub fn stats(&self) -> LogStats {
        LogStats {
            segments: self.segments.len(),
            records: self.segments.iter().map(|s| s.records).sum(),
            bytes: self.segments.iter().map(|s| s.len).sum(),
            first_seq: self.first_seq(),
            last_seq: self.last_seq(),
            next_seq: self.next_seq,
            dirty: self.dirty,
        }
    }

    /// Why the log refuses writes, if it does: poisoned, or a deferred
    /// write failed. [`Log::rebuild`] is the way back.
    pub fn failure(&self) -> Option<String> {
        self.check_writable().err().map(|e| e.to_string())
    }

    fn check_writable(&self) -> Result<()> {
        let reason = match &self.poisoned {
            Some(reason) => reason.clone(),
            None => match self.queue.failure() {
                Some(f) => format!("deferred write failed: {f}"),
                None => return Ok(()),
            },
        };
        Err(Error::Poisoned {
            path: self.root.clone(),
            reason,
        })
    }

    /// Bytes appended but not written yet (deferred writes).
    fn owed_bytes(&self) -> usize {
        self.unwritten.len()
            + self
                .sealed
                .iter()
                .map(|s| s.part.bytes.len())
                .sum::<usize>()
    }

    /// Deferred writes: writes every owed byte now, after the bytes of every
    /// `PendingSync` handed out before (no `fdatasync`). A failure poisons
    /// the log.
    pub(crate) fn write_now(&mut self) -> Result<()> {
        if self.owed_bytes() == 0 {
            return Ok(());
        }
        let mut ticket = self.queue.issue();
        let sealed: Vec<Part> = std::mem::take(&mut self.sealed)
            .into_iter()
            .map(|s| s.part)
            .collect();
        let dir = self.dir_unsynced.take();
        let path = self.segments[self.segments.len() - 1].path.clone();
        let (active, unwritten) = (&self.active, &self.unwritten);
        let written = ticket.write_in_turn(|| {
            write_phase(
                &sealed,
                dir.as_ref().map(|d| (d, self.gen_dir.as_path())),
                (active, &path, unwritten),
            )
        });
        match written {
            Ok(()) => {
                // Sealed and the directory synced; the active segment's
                // bytes wait for the next sync like any others.
                self.unwritten.clear();
                ticket.release();
                Ok(())
            }
            Err(e) => {
                let e = match e {
                    WriteFailed::This(e) => e,
                    WriteFailed::Earlier(reason) => Error::Poisoned {
                        path: self.root.clone(),
                        reason,
                    },
                };
                self.poisoned
                    .get_or_insert_with(|| format!("deferred write failed: {e}"));
                Err(e)
            }
        }
    }

    fn check_payload(&self, len: usize) -> Result<()> {
        if len > self.opts.max_payload_bytes as usize {
            return Err(Error::PayloadTooLarge {
                len,
                max: self.opts.max_payload_bytes,
            });
        }
        Ok(())
    }

    /// Appends one record stamped with the current time.
    pub fn append(&mut self, payload: &[u8]) -> Result<Appended> {
        self.append_at(now_ms(), payload)
    }

    /// Appends one record with the given timestamp (unix ms). With
    /// `FsyncPolicy::Always`, returns after `fdatasync`.
    pub fn append_at(&mut self, ts_ms: u64, payload: &[u8]) -> Result<Appended> {
        let range = self.append_batch_at(ts_ms, std::iter::once(payload))?;
        Ok(Appended {
            seq: range.map_or(self.next_seq - 1, |r| *r.start()),
            ts_ms,
        })
    }

    /// Appends several records with one write per segment touched and (with
    /// `FsyncPolicy::Always`) one `fdatasync`. Returns their sequence numbers,
    /// or `None` for an empty batch. All payloads are checked before anything
    /// is written, so a too-large payload rejects the whole batch.
    pub fn append_batch_at<I, P>(
        &mut self,
        ts_ms: u64,
        payloads: I,
    ) -> Result<Option<RangeInclusive<u64>>>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        self.check_writable()?;
        let payloads: Vec<P> = payloads.into_iter().collect();
        for p in &payloads {
            self.check_payload(p.as_ref().len())?;
        }
        if payloads.is_empty() {
            return Ok(None);
        }
        let first = self.next_seq;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut pending: Vec<(u64, u64)> = Vec::new(); // (seq, size)
        let mut result = Ok(());
        for p in &payloads {
            let p = p.as_ref();
            let size = frame_size(p.len());
            let active = self.active_segment();
            let projected = active.len + buf.len() as u64 + size;
            let has_records = active.records > 0 || !pending.is_empty();
            // Once a spare is ready, a segment that was not one is left at
            // once (for the log's first segment, or the one a restart or
            // a missing spare left): the gain is per `fdatasync`.
            let to_spare = self.spare_ready && !self.active_preallocated;
            if has_records && (projected > self.opts.segment_max_bytes || to_spare) {
                result = self
                    .write_pending(&buf, &pending, ts_ms)
                    .and_then(|()| self.rotate());
                buf.clear();
                pending.clear();
                if result.is_err() {
                    break;
                }
            }
            let seq = self.next_seq + pending.len() as u64;
            encode_frame(&mut buf, seq, ts_ms, p);
            pending.push((seq, size));
        }
        if result.is_ok() {
            result = self.write_pending(&buf, &pending, ts_ms);
        }
        buf.clear();
        self.buf = buf;
        result?;
        if self.opts.fsync == FsyncPolicy::Always {
            self.sync()?;
        } else if self.owed_bytes() > MAX_UNWRITTEN {
            self.write_now()?;
        }
        Ok(Some(first..=self.next_seq - 1))
    }

    fn active_segment(&self) -> &Segment {
        // The log always has at least one segment: `open` creates one.
        &self.segments[self.segments.len() - 1]
    }

    /// Writes encoded frames to the active segment; on failure, cuts the file
    /// back so no partial frame is left behind (or poisons the log if even
    /// that fails).
    fn write_pending(&mut self, buf: &[u8], pending: &[(u64, u64)], ts_ms: u64) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let idx = self.segments.len() - 1;
        let base = self.segments[idx].len;
        self.appended_bytes += buf.len() as u64;
        if self.opts.defer_writes {
            self.unwritten.extend_from_slice(buf);
        } else if let Err(e) = self.active.write_all(buf) {
            let path = self.segments[idx].path.clone();
            if let Err(e2) = self.active.set_len(base) {
                self.poisoned = Some(format!(
                    "write failed ({e}) and truncating back failed ({e2})"
                ));
            }
            return Err(Error::Io {
                op: "append to segment",
                path,
                source: e,
            });
        }
        let seg = &mut self.segments[idx];
        let mut off = base;
        for (seq, size) in pending {
            seg.note(*seq, ts_ms, off, *size);
            off += size;
        }
        self.next_seq += pending.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Seals the active segment (fsyncs it) and starts a new one; then applies
    /// retention. A no-op when the active segment has no records.
    pub(crate) fn rotate(&mut self) -> Result<()> {
        if self.active_segment().records == 0 {
            return Ok(());
        }
        if self.opts.defer_writes {
            return self.rotate_deferred();
        }
        self.sync()?;
        let (f, seg) = create_segment(&self.gen_dir, self.next_seq)?;
        self.active = f;
        self.segments.push(seg);
        self.enforce_retention()?;
        Ok(())
    }

    /// Rotation with deferred writes: create the next segment (its header
    /// is its first owed bytes) and leave the old one's last bytes, its
    /// fsync and the directory's to the next `PendingSync` or `sync`.
    fn rotate_deferred(&mut self) -> Result<()> {
        self.check_writable()?;
        let path = self.gen_dir.join(segment_file_name(self.next_seq));
        let dir = File::open(&self.gen_dir).map_err(io_err("open generation", &self.gen_dir))?;
        let spare = self.take_spare(&dir, &path);
        self.spare_ready = false;
        self.active_preallocated = spare.is_some();
        let file = match spare {
            Some(f) => f,
            None => OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_err("create segment", &path))?,
        };
        let old_file = std::mem::replace(&mut self.active, file);
        let old = self.active_segment();
        let sealed = Sealed {
            name_seq: old.name_seq,
            part: Part {
                file: old_file,
                path: old.path.clone(),
                bytes: std::mem::take(&mut self.unwritten),
            },
        };
        self.sealed.push(sealed);
        self.unwritten.extend_from_slice(&SEGMENT_MAGIC);
        self.segments.push(Segment::empty(self.next_seq, path));
        self.dir_unsynced = Some(dir);
        self.dirty = true;
        self.enforce_retention()?;
        Ok(())
    }

    /// `fdatasync`s the active segment if anything was appended since the last
    /// sync. A failure poisons the log (the kernel may have dropped the dirty
    /// pages, so retrying could falsely report success).
    ///
    /// With deferred writes, it writes what is owed (after any handed-out
    /// `PendingSync`'s bytes), seals rotated-out segments, and returns only
    /// once every `PendingSync` taken before it has finished its fsyncs too:
    /// a barrier even when nothing was appended since.
    pub fn sync(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.opts.defer_writes {
            // The same path as a syncer's: write in turn, fsync, and return
            // once everything taken before is durable too. With nothing new
            // to write, still a barrier: a `PendingSync` taken earlier may
            // not have finished.
            let Some(pending) = self.take_pending_sync()? else {
                let mut barrier = self.queue.issue();
                let reason = match barrier.write_in_turn(|| Ok::<(), Error>(())) {
                    Ok(()) => barrier.settle().err(),
                    Err(WriteFailed::Earlier(reason)) => Some(reason),
                    Err(WriteFailed::This(e)) => Some(e.to_string()),
                };
                return match reason {
                    None => Ok(()),
                    Some(reason) => Err(Error::Poisoned {
                        path: self.root.clone(),
                        reason,
                    }),
                };
            };
            if let Err(e) = pending.run() {
                self.poisoned
                    .get_or_insert_with(|| format!("sync failed: {e}"));
                return Err(e);
            }
            return Ok(());
        }
        if !self.dirty {
            return Ok(());
        }
        if let Err(e) = self.active.sync_data() {
            self.poisoned = Some(format!("fdatasync failed: {e}"));
            return Err(Error::Io {
                op: "fdatasync segment",
                path: self.active_segment().path.clone(),
                source: e,
            });
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Hands out the fsync of everything appended so far, to run without
    /// holding the `Log` (for a writer that keeps the log behind a mutex and
    /// must not block appenders during `fdatasync`). Marks the log clean;
    /// appends made after this call are not covered by the returned handle.
    /// If [`PendingSync::run`] fails, call [`Log::poison`].
    pub fn take_pending_sync(&mut self) -> Result<Option<PendingSync>> {
        self.check_writable()?;
        if !self.dirty {
            return Ok(None);
        }
        let path = self.active_segment().path.clone();
        let file = self
            .active
            .try_clone()
            .map_err(io_err("dup segment for fsync", &path))?;
        let mut parts: Vec<Part> = std::mem::take(&mut self.sealed)
            .into_iter()
            .map(|s| s.part)
            .collect();
        parts.push(Part {
            file,
            path,
            bytes: std::mem::take(&mut self.unwritten),
        });
        // Always a ticket with deferred writes, even with nothing to write:
        // the fdatasync must not run before the bytes handed out earlier
        // are written.
        let ticket = self.opts.defer_writes.then(|| self.queue.issue());
        let dir = self.dir_unsynced.take().map(|d| (d, self.gen_dir.clone()));
        self.dirty = false;
        self.last_sync = Instant::now();
        self.pending_syncs += 1;
        Ok(Some(PendingSync {
            root: self.root.clone(),
            parts,
            dir,
            ticket,
        }))
    }

    /// With [`LogOptions::preallocate`]: the spare segment file to write
    /// now, if none is ready (and the log has not failed). Run the job
    /// without holding the log; rotations use the file once it is ready.
    /// One job at a time: the caller runs them one after the other.
    pub fn spare_job(&self) -> Option<SpareJob> {
        if !(self.opts.preallocate && self.opts.defer_writes) || self.poisoned.is_some() {
            return None;
        }
        let ready = self.gen_dir.join(SPARE_NAME);
        if fs::symlink_metadata(&ready).is_ok() {
            return None;
        }
        Some(SpareJob {
            tmp: self.gen_dir.join(SPARE_TMP_NAME),
            ready,
            len: self.opts.segment_max_bytes,
        })
    }

    /// Frame bytes appended, and [`PendingSync`]s handed out, since the log
    /// was opened: from two readings, a writer learns how many bytes each
    /// `fdatasync` carried lately (preallocation pays for small ones; see
    /// [`LogOptions::preallocate`]).
    pub fn sync_totals(&self) -> (u64, u64) {
        (self.appended_bytes, self.pending_syncs)
    }

    /// The generation (one per compaction or rebuild; see the crate docs).
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// Tells the log that the job it handed out ([`Log::spare_job`]) has
    /// finished: the next append starts a new segment in the spare if the
    /// active one is not one already (else the next rotation takes it).
    pub fn spare_written(&mut self) {
        self.spare_ready = self.opts.preallocate && self.opts.defer_writes;
    }

    /// Moves a ready spare file to `path` (never over an existing file) and
    /// returns it open for writing from its start: the segment header is
    /// the first owed bytes, and every later write follows at the shared
    /// file offset, in ticket order, as with `O_APPEND`. The file is opened
    /// before it is moved, so a failure leaves either the spare or the
    /// segment, never a segment of zeros nobody holds. `None` when there is
    /// no spare, preallocation is off, or it cannot be used (then the
    /// rotation creates a file as without preallocation).
    fn take_spare(&self, dir: &File, path: &Path) -> Option<File> {
        if !self.opts.preallocate {
            return None;
        }
        let spare = self.gen_dir.join(SPARE_NAME);
        let file = match OpenOptions::new().write(true).open(&spare) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %spare.display(), error = %e, "record log: cannot open the spare segment; creating one instead");
                return None;
            }
        };
        match nix::fcntl::renameat2(
            dir,
            spare.as_path(),
            dir,
            path,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Some(file),
            Err(e) => {
                // EINVAL: a file system without RENAME_NOREPLACE.
                tracing::warn!(path = %path.display(), error = %e, "record log: cannot move the spare segment into place; creating one instead");
                None
            }
        }
    }

    /// Refuses all further writes (see [`Error::Poisoned`]). For callers whose
    /// [`PendingSync::run`] failed.
    pub fn poison(&mut self, reason: impl Into<String>) {
        self.poisoned.get_or_insert_with(|| reason.into());
    }

    /// With `FsyncPolicy::Interval(d)`: syncs if there are unsynced appends
    /// and `d` has passed since the last sync. Returns whether it synced.
    pub fn sync_if_due(&mut self) -> Result<bool> {
        match self.sync_due_in() {
            Some(d) if d.is_zero() => self.sync().map(|()| true),
            _ => Ok(false),
        }
    }

    /// How long until [`sync_if_due`](Self::sync_if_due) would sync: `None`
    /// when nothing is waiting (or under `Always`).
    pub fn sync_due_in(&self) -> Option<Duration> {
        match self.opts.fsync {
            FsyncPolicy::Interval(d) if self.dirty => {
                Some(d.saturating_sub(self.last_sync.elapsed()))
            }
            _ => None,
        }
    }

    /// Applies retention with the current time. See [`Retention`].
    pub fn enforce_retention(&mut self) -> Result<RetentionReport> {
        self.enforce_retention_at(now_ms())
    }

    /// Applies retention as if it were `now_ms`: drops whole segments from the
    /// oldest while the log is over `max_total_bytes` or the oldest segment's
    /// newest record is older than `max_age`. Never drops the active segment.
    pub fn enforce_retention_at(&mut self, now_ms: u64) -> Result<RetentionReport> {
        let mut rep = RetentionReport::default();
        let Retention {
            max_age,
            max_total_bytes,
        } = self.opts.retention;
        if max_age.is_none() && max_total_bytes.is_none() {
            return Ok(rep);
        }
        let mut total: u64 = self.segments.iter().map(|s| s.len).sum();
        while self.segments.len() > 1 {
            let front = &self.segments[0];
            let over_size = max_total_bytes.is_some_and(|m| total > m);
            let too_old = max_age.is_some_and(|a| {
                front
                    .max_ts
                    .is_none_or(|t| t.saturating_add(duration_ms(a)) < now_ms)
            });
            if !(over_size || too_old) {
                break;
            }
            fs::remove_file(&front.path)
                .map_err(io_err("remove segment (retention)", &front.path))?;
            total -= front.len;
            rep.segments_removed += 1;
            rep.records_removed += front.records;
            rep.bytes_removed += front.len;
            self.segments.remove(0);
        }
        if rep.segments_removed > 0 {
            sync_dir(&self.gen_dir)?;
            tracing::debug!(?rep, "record log retention");
        }
        Ok(rep)
    }

    /// Reads every record, oldest first.
    pub fn iter(&self) -> Result<LogIter> {
        self.snapshot(0, 0, u64::MAX)
    }

    /// Reads records with `seq >= from_seq`, oldest first.
    pub fn read_from_seq(&self, from_seq: u64) -> Result<LogIter> {
        self.snapshot(from_seq, 0, u64::MAX)
    }

    /// Reads records with `ts_ms >= since_ts_ms`, in sequence order. Whole
    /// segments whose newest record is older are skipped; inside a segment,
    /// records are filtered one by one, so a clock that stepped back does not
    /// hide later records.
    pub fn read_since(&self, since_ts_ms: u64) -> Result<LogIter> {
        self.snapshot(0, since_ts_ms, u64::MAX)
    }

    pub(crate) fn snapshot(&self, from_seq: u64, since_ts: u64, max_seq: u64) -> Result<LogIter> {
        if self.opts.defer_writes {
            // Bytes handed out are being written by their `PendingSync`s
            // (which need no lock); wait for them, and read only up to what
            // is written.
            self.queue.wait_idle().map_err(|reason| Error::Poisoned {
                path: self.root.clone(),
                reason,
            })?;
        }
        let mut cursors = Vec::new();
        let active_seq = self.active_segment().name_seq;
        for seg in &self.segments {
            let owed = if seg.name_seq == active_seq {
                self.unwritten.len()
            } else {
                self.sealed
                    .iter()
                    .find(|s| s.name_seq == seg.name_seq)
                    .map_or(0, |s| s.part.bytes.len())
            } as u64;
            let (Some(last), Some(max_ts)) = (seg.last_seq, seg.max_ts) else {
                continue;
            };
            if last < from_seq || max_ts < since_ts || seg.first_seq.is_some_and(|f| f > max_seq) {
                continue;
            }
            let file =
                File::open(&seg.path).map_err(io_err("open segment for reading", &seg.path))?;
            let start = if cursors.is_empty() {
                seg.seek_offset(from_seq)
            } else {
                SEGMENT_HEADER_LEN
            };
            cursors.push(SegmentCursor {
                path: seg.path.clone(),
                file,
                start,
                end: seg.len - owed,
            });
        }
        Ok(LogIter::new(cursors, from_seq, max_seq, since_ts))
    }
}

impl Drop for Log {
    /// With deferred writes, owed bytes are written (not fsynced) on the way
    /// out, unless a handed-out `PendingSync` has not run yet: waiting for
    /// it could hang, and writing before it would misplace the frames.
    fn drop(&mut self) {
        if self.opts.defer_writes && self.poisoned.is_none() && self.queue.is_idle() {
            if let Err(e) = self.write_now() {
                tracing::warn!(dir = %self.root.display(), error = %e, "record log: owed writes lost on close");
            } else if self.active_preallocated {
                // A clean close leaves no unused zeros: opened again
                // without preallocation, the log would report them.
                let len = self.active_segment().len;
                if let Err(e) = self.active.set_len(len) {
                    tracing::warn!(dir = %self.root.display(), error = %e, "record log: could not trim the preallocated segment on close");
                }
            }
        }
    }
}
