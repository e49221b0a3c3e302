//! A connection's read buffer, with the size of its allocation known.
//!
//! `BytesMut::capacity` counts from the buffer's start, which moves past
//! every frame split off its front: a buffer that grew to 1 MiB for one
//! pipeline reports almost nothing once that is consumed, while the whole
//! allocation is still held. So only this type grows the buffer. It makes
//! room inside the allocation when the buffer is its only user
//! (`BytesMut::try_reclaim`, which never allocates), and otherwise replaces
//! it with an allocation of a size it chooses and records. The server
//! charges [`ReadBuffer::held_after`] to its memory budget before any
//! allocation is made.
//!
//! A frame partly decoded keeps the buffer shared through its arguments so
//! far (slices of it), so before room is made inside a frame the server has
//! the decoder copy them out (`Decoder::unpin`): then the room is reclaimed
//! in place, or the old allocation is freed when it is replaced, never left
//! pinned and uncounted.

use std::collections::VecDeque;

use bytes::BytesMut;

/// A read buffer and what its allocations hold.
#[derive(Debug)]
pub(crate) struct ReadBuffer {
    /// The bytes read and not yet decoded.
    pub(crate) buf: BytesMut,
    /// Bytes of `buf`'s allocation.
    alloc: usize,
}

/// What a read needs before it can go into the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// The allocation has room (made, if need be, without allocating).
    Ready,
    /// A new allocation of this many bytes.
    Grow(usize),
}

impl ReadBuffer {
    /// An empty buffer of `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let buf = BytesMut::with_capacity(capacity);
        Self {
            alloc: buf.capacity(),
            buf,
        }
    }

    /// Bytes of the current allocation.
    #[cfg(test)]
    pub(crate) fn alloc(&self) -> usize {
        self.alloc
    }

    /// Makes room for a read of `want` bytes inside the allocation if it
    /// can; else says how large the new allocation must be: the undecoded
    /// bytes plus `want`.
    ///
    /// No more: the undecoded bytes are at most one token (the decoder
    /// splits every argument off as it completes, and a large bulk body
    /// goes into a buffer of its own), so the copy stays small without
    /// growing ahead.
    pub(crate) fn room_for(&mut self, want: usize) -> Room {
        if self.buf.capacity() - self.buf.len() >= want || self.buf.try_reclaim(want) {
            Room::Ready
        } else {
            Room::Grow(self.buf.len() + want)
        }
    }

    /// The bytes held once `room` is carried out.
    pub(crate) fn held_after(&self, room: Room) -> usize {
        match room {
            Room::Ready => self.alloc,
            Room::Grow(n) => n,
        }
    }

    /// Carries out `room`: a new allocation of its size, with the
    /// undecoded bytes moved over (the old one is freed: nothing else
    /// refers to it, see the module docs).
    pub(crate) fn make_room(&mut self, room: Room) {
        if let Room::Grow(n) = room {
            self.replace(n);
        }
    }

    /// Gives back an empty buffer whose allocation is over `keep` bytes,
    /// for one of `initial`; not while a frame is in progress, whose
    /// arguments so far may still be slices of it (giving it back would
    /// free nothing, and only hide it from the charge).
    pub(crate) fn give_back(&mut self, keep: usize, initial: usize, in_frame: bool) {
        if self.buf.is_empty() && self.alloc > keep && !in_frame {
            self.replace(initial);
        }
    }

    fn replace(&mut self, n: usize) {
        let mut fresh = BytesMut::with_capacity(n);
        fresh.extend_from_slice(&self.buf);
        self.alloc = fresh.capacity();
        self.buf = fresh;
    }
}

/// Input taken from a client while its replies could not be written,
/// kept in order until the decoder is ready for it.
///
/// A client may send a whole pipeline before it reads any reply. If the
/// server only wrote while replies waited, both would wait for each other
/// once the kernel's buffers filled up each way (about 200 KB on a Unix
/// socket, some MB on loopback TCP). So while a write is blocked the server
/// reads on into this backlog (charged to its buffer budget, at most
/// [`Backlog::MAX`], and only while half the server's budget stays free),
/// and its next reads come from here first.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    chunks: VecDeque<Chunk>,
    /// Bytes of the chunks' allocations.
    held: usize,
    /// The client shut down its side while input was being taken.
    pub(crate) eof: bool,
}

#[derive(Debug)]
struct Chunk {
    data: Box<[u8]>,
    /// Unread bytes are `data[start..end]`.
    start: usize,
    end: usize,
}

impl Backlog {
    /// Allocation per chunk (64 KiB).
    pub(crate) const CHUNK: usize = 64 << 10;
    /// Most a connection takes ahead (64 MiB, as the largest `MGET` reply).
    pub(crate) const MAX: usize = 64 << 20;

    /// Bytes of the backlog's allocations.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// No unread input (there may still be an empty chunk to read into).
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.iter().all(|c| c.start == c.end)
    }

    /// Room to read into at the back: the last chunk's, or `None` when a
    /// new chunk is needed first ([`Backlog::add_chunk`]).
    pub(crate) fn room(&mut self) -> Option<&mut [u8]> {
        let last = self.chunks.back_mut()?;
        (last.end < last.data.len()).then(|| &mut last.data[last.end..])
    }

    /// A new chunk at the back; charge `held() + CHUNK` first.
    pub(crate) fn add_chunk(&mut self) {
        self.chunks.push_back(Chunk {
            data: vec![0; Self::CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        });
        self.held += Self::CHUNK;
    }

    /// `n` bytes were read into [`Backlog::room`].
    pub(crate) fn filled(&mut self, n: usize) {
        if let Some(last) = self.chunks.back_mut() {
            assert!(last.end + n <= last.data.len(), "filled past the room");
            last.end += n;
        } else {
            assert_eq!(n, 0, "filled without a chunk");
        }
    }

    /// Moves the oldest input into `target`, as much as its spare capacity
    /// takes (it never grows: its allocation was charged), freeing the
    /// chunks emptied. Returns the bytes moved.
    pub(crate) fn drain_into(&mut self, target: &mut BytesMut) -> usize {
        let mut moved = 0;
        while let Some(front) = self.chunks.front_mut() {
            let n = (front.end - front.start).min(target.capacity() - target.len());
            target.extend_from_slice(&front.data[front.start..front.start + n]);
            front.start += n;
            moved += n;
            if front.start < front.end {
                break;
            }
            self.chunks.pop_front();
            self.held -= Self::CHUNK;
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Decoder, Limits};

    /// Input goes through the backlog in order and unchanged, in pieces as
    /// the target's spare room allows; the target never grows, and the
    /// chunks are freed as they are emptied.
    #[test]
    fn the_backlog_gives_input_back_in_order_within_the_room_given() {
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut b = Backlog::default();
        assert!(b.is_empty());
        assert!(b.room().is_none());
        let mut taken = 0;
        for piece in input.chunks(10_000) {
            let mut piece = piece;
            while !piece.is_empty() {
                if b.room().is_none() {
                    b.add_chunk();
                }
                let room = b.room().unwrap();
                let n = room.len().min(piece.len());
                room[..n].copy_from_slice(&piece[..n]);
                b.filled(n);
                piece = &piece[n..];
                taken += n;
            }
        }
        assert_eq!(taken, input.len());
        assert_eq!(
            b.held(),
            4 * Backlog::CHUNK,
            "200,000 bytes in 64 KiB chunks"
        );
        let mut out = Vec::new();
        while !b.is_empty() {
            let mut target = BytesMut::with_capacity(7_000);
            target.extend_from_slice(b"xyz");
            let cap = target.capacity();
            let n = b.drain_into(&mut target);
            assert_eq!(target.capacity(), cap);
            assert_eq!(n, (cap - 3).min(input.len() - out.len()));
            out.extend_from_slice(&target[3..]);
        }
        assert_eq!(out, input);
        assert_eq!(b.held(), 0, "every chunk freed");
        assert!(b.room().is_none());
    }

    const KIB: usize = 1024;

    /// Reads `n` bytes into `rb`.
    fn read(rb: &mut ReadBuffer, n: usize) -> Room {
        let room = rb.room_for(n);
        rb.make_room(room);
        assert!(rb.buf.capacity() - rb.buf.len() >= n);
        rb.buf.extend_from_slice(&vec![b'r'; n]);
        room
    }

    #[test]
    fn a_consumed_buffer_is_still_counted_and_its_room_reused() {
        let mut rb = ReadBuffer::with_capacity(16 * KIB);
        // A large token grows it to 1 MiB, then it is split off.
        while rb.buf.len() < (1 << 20) {
            read(&mut rb, 32 * KIB);
        }
        assert_eq!(rb.alloc(), 1 << 20);
        let start = rb.buf.as_ptr();
        drop(rb.buf.split_to(rb.buf.len()));
        assert!(rb.buf.capacity() < 32 * KIB, "capacity alone hides it");
        assert_eq!(rb.held_after(Room::Ready), 1 << 20);
        // The next reads reclaim the same allocation.
        assert_eq!(read(&mut rb, 32 * KIB), Room::Ready);
        assert_eq!(rb.buf.as_ptr(), start);
        assert_eq!(rb.alloc(), 1 << 20);
        // Empty, it is given back, but not while a frame is in progress
        // (its arguments may be slices of it); a small one is kept.
        drop(rb.buf.split_to(rb.buf.len()));
        rb.give_back(128 * KIB, 16 * KIB, true);
        assert_eq!(rb.alloc(), 1 << 20);
        rb.give_back(128 * KIB, 16 * KIB, false);
        assert_eq!(rb.alloc(), 16 * KIB);
        assert_eq!(rb.buf.capacity(), 16 * KIB);
        let kept = rb.buf.as_ptr();
        rb.give_back(128 * KIB, 16 * KIB, false);
        assert_eq!(rb.buf.as_ptr(), kept);
    }

    #[test]
    fn growth_is_announced_before_it_is_made_and_only_as_large_as_the_read_needs() {
        let mut rb = ReadBuffer::with_capacity(16 * KIB);
        read(&mut rb, 10 * KIB);
        let room = rb.room_for(32 * KIB);
        assert_eq!(room, Room::Grow(42 * KIB), "undecoded bytes plus the read");
        assert_eq!(rb.alloc(), 16 * KIB, "nothing allocated yet");
        assert_eq!(rb.held_after(room), 42 * KIB);
        rb.make_room(room);
        assert_eq!(rb.alloc(), 42 * KIB);
        assert_eq!(rb.buf.capacity(), 42 * KIB);
        assert_eq!(&rb.buf[..], &vec![b'r'; 10 * KIB][..], "data moved over");
        // Shared with a slice split off it, it cannot be reclaimed: the new
        // one holds what is left plus the read.
        let _arg = rb.buf.split_to(5 * KIB).freeze();
        assert_eq!(rb.room_for(40 * KIB), Room::Grow(45 * KIB));
    }

    /// The decoder over a read buffer driven as the server drives it
    /// (`unpin` before room is made inside a frame), on a pipeline whose
    /// reads never end on a frame boundary for long, and on a client that
    /// sends one small argument per read: the buffer is reused in place,
    /// and what the frame in progress holds is its own bytes.
    #[test]
    fn reads_ending_inside_frames_reuse_the_buffer() {
        fn drive(input: &[u8], chunk: usize) -> (usize, usize, usize, usize) {
            let mut rb = ReadBuffer::with_capacity(16 * KIB);
            let mut d = Decoder::new(Limits::default());
            let mut args = Vec::new();
            let (mut commands, mut grown, mut most) = (0, 0, 0);
            for part in input.chunks(chunk) {
                let mut room = rb.room_for(part.len());
                if room != Room::Ready && d.in_frame() {
                    d.unpin();
                    room = rb.room_for(part.len());
                }
                most = most.max(rb.held_after(room) + d.partial_bytes());
                grown += usize::from(room != Room::Ready);
                rb.make_room(room);
                rb.buf.extend_from_slice(part);
                while d.decode_command(&mut rb.buf, &mut args).unwrap().is_some() {
                    args.clear();
                    commands += 1;
                }
            }
            (commands, grown, most, rb.alloc())
        }
        let value = vec![b'v'; 2000];
        let mut input = Vec::new();
        for i in 0..5000 {
            let key = format!("key{i}");
            input.extend_from_slice(
                format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$2000\r\n", key.len()).as_bytes(),
            );
            input.extend_from_slice(&value);
            input.extend_from_slice(b"\r\n");
        }
        let (commands, grown, most, alloc) = drive(&input, 16 * KIB + 1);
        assert_eq!(commands, 5000);
        // Of about 630 reads: a few growths while the largest leftover token
        // sets the size (18 when written), then reuse.
        assert!(grown < 40, "{grown} new allocations");
        assert!(most <= 3 * 16 * KIB, "held at most {most} bytes");
        assert!(alloc <= 16 * KIB + 1 + 2100, "{alloc}");

        // One 7-byte argument per read of a 10,001-argument DEL.
        let mut del = b"*10001\r\n$3\r\nDEL\r\n".to_vec();
        for _ in 0..10_000 {
            del.extend_from_slice(b"$1\r\na\r\n");
        }
        let (commands, grown, most, _) = drive(&del, 7);
        assert_eq!(commands, 1);
        assert_eq!(grown, 0);
        let items = 10_001 * std::mem::size_of::<crate::resp::Frame>();
        assert!(
            most <= 16 * KIB + 2 * items + 10_001,
            "held at most {most} bytes"
        );
    }
}
