//! Reading a snapshot of the log without holding the writer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;

use crate::error::{io_err, Error, Result};
use crate::frame::{frame_crc, BODY_FIXED_LEN, FRAME_PREFIX_LEN, MAX_BODY_LEN};

/// One record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number: strictly increasing through the log (gaps are possible
    /// after damage or compaction, never repeats).
    pub seq: u64,
    /// Unix time in milliseconds when the record was appended (or the time the
    /// caller gave).
    pub ts_ms: u64,
    /// The caller's bytes.
    pub payload: Vec<u8>,
}

/// A segment as the reader sees it: an open handle (so retention or
/// compaction deleting the file does not disturb the reader) and a byte range.
#[derive(Debug)]
pub(crate) struct SegmentCursor {
    pub path: PathBuf,
    pub file: File,
    pub start: u64,
    pub end: u64,
}

/// Iterator over a snapshot of the log, oldest first.
///
/// The snapshot is taken when the iterator is created: records appended later
/// are not seen, and segments removed later (retention, compaction) stay
/// readable because their files are already open, except for the segments
/// a compaction replaced once the caller frees them with
/// [`Superseded::release`](crate::Superseded::release), which truncates
/// them: an iterator still reading those fails.
#[derive(Debug)]
pub struct LogIter {
    segments: VecDeque<SegmentCursor>,
    current: Option<(BufReader<File>, PathBuf, u64, u64)>,
    min_seq: u64,
    max_seq: u64,
    since_ts: u64,
    failed: bool,
}

impl LogIter {
    pub(crate) fn new(
        segments: Vec<SegmentCursor>,
        min_seq: u64,
        max_seq: u64,
        since_ts: u64,
    ) -> Self {
        Self {
            segments: segments.into(),
            current: None,
            min_seq,
            max_seq,
            since_ts,
            failed: false,
        }
    }

    fn next_frame(&mut self) -> Result<Option<Record>> {
        loop {
            if self.current.is_none() {
                let Some(seg) = self.segments.pop_front() else {
                    return Ok(None);
                };
                let mut file = seg.file;
                file.seek(SeekFrom::Start(seg.start))
                    .map_err(io_err("seek segment", &seg.path))?;
                self.current = Some((
                    BufReader::with_capacity(64 * 1024, file),
                    seg.path,
                    seg.start,
                    seg.end,
                ));
            }
            let Some((reader, path, pos, end)) = self.current.as_mut() else {
                continue;
            };
            if *pos >= *end {
                self.current = None;
                continue;
            }
            let mut prefix = [0u8; FRAME_PREFIX_LEN];
            reader
                .read_exact(&mut prefix)
                .map_err(io_err("read segment", path.clone()))?;
            let mut len_le = [0u8; 4];
            len_le.copy_from_slice(&prefix[..4]);
            let len = u32::from_le_bytes(len_le);
            let frame_end = *pos + FRAME_PREFIX_LEN as u64 + u64::from(len);
            if (len as usize) < BODY_FIXED_LEN || len > MAX_BODY_LEN || frame_end > *end {
                return Err(Error::CorruptRead {
                    path: path.clone(),
                    offset: *pos,
                    reason: format!("bad length {len}"),
                });
            }
            let mut body = vec![0u8; len as usize];
            reader
                .read_exact(&mut body)
                .map_err(io_err("read segment", path.clone()))?;
            let mut crc_le = [0u8; 4];
            crc_le.copy_from_slice(&prefix[4..]);
            if frame_crc(len_le, &body) != u32::from_le_bytes(crc_le) {
                return Err(Error::CorruptRead {
                    path: path.clone(),
                    offset: *pos,
                    reason: "CRC mismatch".into(),
                });
            }
            *pos = frame_end;
            let mut b8 = [0u8; 8];
            b8.copy_from_slice(&body[..8]);
            let seq = u64::from_le_bytes(b8);
            b8.copy_from_slice(&body[8..16]);
            let ts_ms = u64::from_le_bytes(b8);
            if seq > self.max_seq {
                self.segments.clear();
                self.current = None;
                return Ok(None);
            }
            if seq < self.min_seq || ts_ms < self.since_ts {
                continue;
            }
            body.drain(..BODY_FIXED_LEN);
            return Ok(Some(Record {
                seq,
                ts_ms,
                payload: body,
            }));
        }
    }
}

impl Iterator for LogIter {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_frame() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
