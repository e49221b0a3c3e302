//! On-disk framing of segments and records, and the scan that recovers a segment.
//!
//! ```text
//! segment file := SEGMENT_MAGIC (8 bytes) frame*
//! frame        := len:u32le crc:u32le body
//! body         := seq:u64le ts_ms:u64le payload        (len = 16 + payload length)
//! crc          := crc32c(len:u32le || body)
//! ```
//!
//! The CRC covers the length field too, so a flipped bit in a length is caught
//! whenever the (wrong) length still lands inside the file.

use std::ops::RangeInclusive;

/// First eight bytes of every segment file (format version 1).
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"APLRLOG1";
/// Length of the segment header (the magic).
pub(crate) const SEGMENT_HEADER_LEN: u64 = 8;
/// `len` + `crc`.
pub(crate) const FRAME_PREFIX_LEN: usize = 8;
/// `seq` + `ts_ms`.
pub(crate) const BODY_FIXED_LEN: usize = 16;
/// Smallest possible frame (empty payload).
pub(crate) const MIN_FRAME_LEN: usize = FRAME_PREFIX_LEN + BODY_FIXED_LEN;

/// Hard upper bound on a payload, part of the format: a length field above
/// `BODY_FIXED_LEN + FORMAT_MAX_PAYLOAD` is corruption, whatever the options say.
pub const FORMAT_MAX_PAYLOAD: u32 = 256 << 20;
/// Largest valid length field.
pub(crate) const MAX_BODY_LEN: u32 = FORMAT_MAX_PAYLOAD + 16;

/// The CRC of a frame: over the little-endian length, then the body.
pub(crate) fn frame_crc(len_le: [u8; 4], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len_le), body)
}

/// Appends one encoded frame to `buf`. The caller has checked the payload size
/// against [`FORMAT_MAX_PAYLOAD`].
pub(crate) fn encode_frame(buf: &mut Vec<u8>, seq: u64, ts_ms: u64, payload: &[u8]) {
    let body_len = BODY_FIXED_LEN + payload.len();
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    let len_le = len.to_le_bytes();
    let start = buf.len();
    buf.reserve(FRAME_PREFIX_LEN + body_len);
    buf.extend_from_slice(&len_le);
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&ts_ms.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = frame_crc(len_le, &buf[start + FRAME_PREFIX_LEN..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Size on disk of a frame carrying `payload_len` bytes.
pub(crate) fn frame_size(payload_len: usize) -> u64 {
    (FRAME_PREFIX_LEN + BODY_FIXED_LEN + payload_len) as u64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A frame decoded from the front of a byte slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawFrame<'a> {
    pub seq: u64,
    pub ts_ms: u64,
    pub payload: &'a [u8],
    /// Bytes the whole frame occupies.
    pub frame_len: usize,
}

/// Why the bytes at some offset are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Fewer bytes than the frame prefix, or than the length field announces.
    Incomplete,
    /// The length field is below the minimum or above the format maximum.
    BadLength(u32),
    /// The CRC does not match.
    Checksum,
}

/// Decodes the frame at the start of `buf`.
pub(crate) fn parse_frame(buf: &[u8]) -> Result<RawFrame<'_>, FrameError> {
    if buf.len() < FRAME_PREFIX_LEN {
        return Err(FrameError::Incomplete);
    }
    let len = u32_at(buf, 0);
    let body_len = len as usize;
    if body_len < BODY_FIXED_LEN || len > MAX_BODY_LEN {
        return Err(FrameError::BadLength(len));
    }
    let frame_len = FRAME_PREFIX_LEN + body_len;
    if buf.len() < frame_len {
        return Err(FrameError::Incomplete);
    }
    let body = &buf[FRAME_PREFIX_LEN..frame_len];
    if frame_crc(len.to_le_bytes(), body) != u32_at(buf, 4) {
        return Err(FrameError::Checksum);
    }
    Ok(RawFrame {
        seq: u64_at(body, 0),
        ts_ms: u64_at(body, 8),
        payload: &body[BODY_FIXED_LEN..],
        frame_len,
    })
}

/// Why a segment scan stopped before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageReason {
    /// The segment header (magic) is missing or wrong.
    BadSegmentHeader,
    /// A frame is cut short by the end of the file.
    IncompleteFrame,
    /// Everything from the damage to the end of the file is zero bytes
    /// (space allocated by the file system but never written).
    ZeroFilled,
    /// The length field is impossible.
    BadLength(u32),
    /// The CRC does not match.
    Checksum,
    /// The CRC matches but the sequence number does not follow the previous
    /// record (or the segment's name).
    SequenceOutOfOrder {
        /// The smallest sequence number that would have been accepted.
        expected_at_least: u64,
        /// The sequence number found.
        found: u64,
    },
}

impl std::fmt::Display for DamageReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadSegmentHeader => f.write_str("bad segment header"),
            Self::IncompleteFrame => f.write_str("incomplete frame at end of file"),
            Self::ZeroFilled => f.write_str("zero-filled tail"),
            Self::BadLength(l) => write!(f, "impossible frame length {l}"),
            Self::Checksum => f.write_str("CRC mismatch"),
            Self::SequenceOutOfOrder {
                expected_at_least,
                found,
            } => write!(
                f,
                "sequence {found} out of order (expected at least {expected_at_least})"
            ),
        }
    }
}

/// Where the sparse index takes a sample: at most once per this many bytes.
pub(crate) const INDEX_STRIDE: u64 = 64 * 1024;

/// What scanning one segment's bytes found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentScan {
    /// Bytes from the start of the file up to the end of the last good frame
    /// (at least the header length when the header is good, else 0).
    pub valid_len: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub min_ts: Option<u64>,
    pub max_ts: Option<u64>,
    /// `(seq, offset)` samples for seeking.
    pub index: Vec<(u64, u64)>,
    pub damage: Option<ScanDamage>,
}

/// Damage found in a segment, before the caller decides what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanDamage {
    pub offset: u64,
    pub reason: DamageReason,
    /// Frames after the damage that still verify (CRC and a plausible
    /// sequence): found only to report the loss precisely; they are not loaded.
    pub verifiable_after: u64,
    /// Sequence numbers of those frames.
    pub seqs_after: Option<RangeInclusive<u64>>,
    /// Whether the damaged region is all zero bytes.
    pub all_zero: bool,
}

impl ScanDamage {
    /// A tail is "torn" when nothing after the damage verifies and the damage
    /// looks like an interrupted write; anything else is corruption.
    pub fn is_torn_tail(&self) -> bool {
        self.verifiable_after == 0
            && matches!(
                self.reason,
                DamageReason::IncompleteFrame
                    | DamageReason::ZeroFilled
                    | DamageReason::Checksum
                    | DamageReason::BadLength(_)
            )
    }
}

/// Scans a whole segment file's bytes. `name_seq` is the sequence number in the
/// segment's file name: the first record must carry at least that number.
pub(crate) fn scan_segment(bytes: &[u8], name_seq: u64) -> SegmentScan {
    let mut scan = SegmentScan {
        valid_len: 0,
        records: 0,
        first_seq: None,
        last_seq: None,
        min_ts: None,
        max_ts: None,
        index: Vec::new(),
        damage: None,
    };
    let hdr = SEGMENT_MAGIC.len();
    if bytes.len() < hdr || bytes[..hdr] != SEGMENT_MAGIC {
        let reason = if bytes.len() < hdr && SEGMENT_MAGIC.starts_with(bytes) {
            DamageReason::IncompleteFrame
        } else {
            DamageReason::BadSegmentHeader
        };
        if !bytes.is_empty() {
            scan.damage = Some(damage_at(bytes, 0, reason, name_seq.saturating_sub(1)));
        }
        return scan;
    }
    let mut off = hdr;
    let mut last_indexed: Option<u64> = None;
    let mut expected_min = name_seq;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let frame = match parse_frame(rest) {
            Ok(f) => f,
            Err(e) => {
                let reason = match e {
                    FrameError::Incomplete => DamageReason::IncompleteFrame,
                    FrameError::BadLength(l) => DamageReason::BadLength(l),
                    FrameError::Checksum => DamageReason::Checksum,
                };
                let last_good = scan.last_seq.unwrap_or(name_seq.saturating_sub(1));
                scan.damage = Some(damage_at(bytes, off, reason, last_good));
                break;
            }
        };
        if frame.seq < expected_min {
            let last_good = scan.last_seq.unwrap_or(name_seq.saturating_sub(1));
            scan.damage = Some(damage_at(
                bytes,
                off,
                DamageReason::SequenceOutOfOrder {
                    expected_at_least: expected_min,
                    found: frame.seq,
                },
                last_good,
            ));
            break;
        }
        let pos = off as u64;
        if last_indexed.is_none_or(|l| pos - l >= INDEX_STRIDE) {
            scan.index.push((frame.seq, pos));
            last_indexed = Some(pos);
        }
        scan.records += 1;
        scan.first_seq.get_or_insert(frame.seq);
        scan.last_seq = Some(frame.seq);
        scan.min_ts = Some(scan.min_ts.map_or(frame.ts_ms, |t| t.min(frame.ts_ms)));
        scan.max_ts = Some(scan.max_ts.map_or(frame.ts_ms, |t| t.max(frame.ts_ms)));
        expected_min = frame.seq + 1;
        off += frame.frame_len;
    }
    scan.valid_len = scan
        .damage
        .as_ref()
        .map_or(bytes.len() as u64, |d| d.offset);
    scan
}

/// Describes damage at `off` and looks past it for frames that still verify.
fn damage_at(bytes: &[u8], off: usize, reason: DamageReason, last_good: u64) -> ScanDamage {
    let region = &bytes[off..];
    let all_zero = region.iter().all(|b| *b == 0);
    let reason = if all_zero && !matches!(reason, DamageReason::BadSegmentHeader) {
        DamageReason::ZeroFilled
    } else {
        reason
    };
    let (verifiable_after, seqs_after) = if all_zero {
        (0, None)
    } else {
        find_verifiable_frames(bytes, off + 1, last_good)
    };
    ScanDamage {
        offset: off as u64,
        reason,
        verifiable_after,
        seqs_after,
        all_zero,
    }
}

/// Counts frames at or after `from` that verify and whose sequence number is
/// plausible (above `last_good`, and not further above it than the number of
/// frames that could fit in the file, plus slack). Used only for reporting:
/// the plausibility window keeps random garbage from ever costing a CRC pass
/// at most offsets, so this is linear in practice.
fn find_verifiable_frames(
    bytes: &[u8],
    from: usize,
    last_good: u64,
) -> (u64, Option<RangeInclusive<u64>>) {
    const SEQ_SLACK: u64 = 1 << 20;
    let max_plausible = last_good
        .saturating_add((bytes.len() / MIN_FRAME_LEN) as u64)
        .saturating_add(SEQ_SLACK);
    let mut p = from;
    let mut count = 0u64;
    let mut lo: Option<u64> = None;
    let mut hi = 0u64;
    let mut floor = last_good;
    while p + MIN_FRAME_LEN <= bytes.len() {
        let rest = &bytes[p..];
        let len = u32_at(rest, 0) as usize;
        let plausible_len = len >= BODY_FIXED_LEN && p + FRAME_PREFIX_LEN + len <= bytes.len();
        if plausible_len {
            let seq = u64_at(rest, FRAME_PREFIX_LEN);
            if seq > floor && seq <= max_plausible {
                if let Ok(f) = parse_frame(rest) {
                    count += 1;
                    lo.get_or_insert(f.seq);
                    hi = f.seq;
                    floor = f.seq;
                    p += f.frame_len;
                    continue;
                }
            }
        }
        p += 1;
    }
    (count, lo.map(|l| l..=hi))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn segment(records: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut b = SEGMENT_MAGIC.to_vec();
        for (s, t, p) in records {
            encode_frame(&mut b, *s, *t, p);
        }
        b
    }

    #[test]
    fn frame_round_trip() {
        let mut b = Vec::new();
        encode_frame(&mut b, 7, 99, b"hello");
        assert_eq!(b.len() as u64, frame_size(5));
        let f = parse_frame(&b).unwrap();
        assert_eq!(
            (f.seq, f.ts_ms, f.payload, f.frame_len),
            (7, 99, &b"hello"[..], b.len())
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut b = Vec::new();
        encode_frame(&mut b, 1, 2, b"payload bytes");
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(
                    parse_frame(&c).is_err(),
                    "flip at byte {i} bit {bit} undetected"
                );
            }
        }
    }

    #[test]
    fn clean_scan() {
        let b = segment(&[(5, 1, b"a"), (6, 2, b"bb"), (8, 3, b"")]);
        let s = scan_segment(&b, 5);
        assert_eq!(s.records, 3);
        assert_eq!(s.valid_len, b.len() as u64);
        assert_eq!((s.first_seq, s.last_seq), (Some(5), Some(8)));
        assert_eq!((s.min_ts, s.max_ts), (Some(1), Some(3)));
        assert!(s.damage.is_none());
    }

    #[test]
    fn truncated_tail_is_torn() {
        let b = segment(&[(1, 1, b"aaaa"), (2, 1, b"bbbb")]);
        let cut = b.len() - 3;
        let s = scan_segment(&b[..cut], 1);
        assert_eq!(s.records, 1);
        let d = s.damage.unwrap();
        assert_eq!(d.reason, DamageReason::IncompleteFrame);
        assert!(d.is_torn_tail());
        assert_eq!(s.valid_len, d.offset);
    }

    #[test]
    fn middle_flip_is_corruption_and_counts_what_follows() {
        let recs: Vec<(u64, u64, Vec<u8>)> = (1..=10).map(|i| (i, i, vec![i as u8; 10])).collect();
        let refs: Vec<(u64, u64, &[u8])> = recs.iter().map(|(s, t, p)| (*s, *t, &p[..])).collect();
        let mut b = segment(&refs);
        // Flip a payload byte of record 4.
        let off = 8 + 3 * frame_size(10) as usize + 24 + 2;
        b[off] ^= 0x40;
        let s = scan_segment(&b, 1);
        assert_eq!(s.records, 3);
        let d = s.damage.unwrap();
        assert_eq!(d.reason, DamageReason::Checksum);
        assert!(!d.is_torn_tail());
        assert_eq!(d.verifiable_after, 6);
        assert_eq!(d.seqs_after, Some(5..=10));
    }

    #[test]
    fn length_flip_in_middle_is_not_mistaken_for_torn_tail() {
        let recs: Vec<(u64, u64, Vec<u8>)> = (1..=5).map(|i| (i, i, vec![1; 10])).collect();
        let refs: Vec<(u64, u64, &[u8])> = recs.iter().map(|(s, t, p)| (*s, *t, &p[..])).collect();
        let mut b = segment(&refs);
        let off = 8 + frame_size(10) as usize + 3; // high byte of record 2's length
        b[off] = 0x7f;
        let s = scan_segment(&b, 1);
        assert_eq!(s.records, 1);
        let d = s.damage.unwrap();
        assert!(!d.is_torn_tail(), "{d:?}");
        assert_eq!(d.seqs_after, Some(3..=5));
    }

    #[test]
    fn zero_tail() {
        let mut b = segment(&[(1, 1, b"x")]);
        b.extend_from_slice(&[0; 100]);
        let s = scan_segment(&b, 1);
        let d = s.damage.unwrap();
        assert_eq!(d.reason, DamageReason::ZeroFilled);
        assert!(d.is_torn_tail());
        assert_eq!(s.records, 1);
    }

    #[test]
    fn bad_header() {
        let mut b = segment(&[(1, 1, b"x")]);
        b[0] = b'X';
        let s = scan_segment(&b, 1);
        assert_eq!(s.valid_len, 0);
        assert_eq!(s.damage.unwrap().reason, DamageReason::BadSegmentHeader);
        // A header cut short is an interrupted creation.
        let s = scan_segment(&SEGMENT_MAGIC[..3], 1);
        assert_eq!(s.damage.unwrap().reason, DamageReason::IncompleteFrame);
    }

    #[test]
    fn sequence_going_backwards_is_damage() {
        let b = segment(&[(3, 1, b"x"), (2, 1, b"y")]);
        let s = scan_segment(&b, 3);
        assert_eq!(s.records, 1);
        assert!(matches!(
            s.damage.unwrap().reason,
            DamageReason::SequenceOutOfOrder {
                expected_at_least: 4,
                found: 2
            }
        ));
        let b = segment(&[(1, 1, b"x")]);
        assert!(
            scan_segment(&b, 2).damage.is_some(),
            "below the name's sequence"
        );
    }

    proptest::proptest! {
        #[test]
        fn scan_never_panics_and_never_loads_past_damage(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cut in 0usize..600,
        ) {
            let mut b = segment(&[(1, 1, b"abc"), (2, 2, b"defgh")]);
            let good = b.len();
            b.extend_from_slice(&data);
            let s = scan_segment(&b[..cut.min(b.len())], 1);
            proptest::prop_assert!(s.valid_len as usize <= b.len());
            if cut >= good {
                proptest::prop_assert!(s.records >= 2);
            }
        }
    }
}
