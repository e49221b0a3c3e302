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
//! An allocation replaced while a frame is partly decoded can still be
//! pinned by that frame's arguments decoded so far (slices of it), until the
//! frame completes; it stays counted until the caller says that frame is
//! done ([`ReadBuffer::frame_done`]: a command completed, or the decoder is
//! between frames).

use bytes::BytesMut;

/// A read buffer and what its allocations hold.
#[derive(Debug)]
pub(crate) struct ReadBuffer {
    /// The bytes read and not yet decoded.
    pub(crate) buf: BytesMut,
    /// Bytes of `buf`'s allocation.
    alloc: usize,
    /// Bytes of allocations replaced while a frame was in progress.
    pinned: usize,
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
            pinned: 0,
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
    /// growing ahead. The usual reason for a new allocation is not a large
    /// token but a read that ended inside a frame, whose arguments so far
    /// keep the old allocation shared until the frame completes.
    pub(crate) fn room_for(&mut self, want: usize) -> Room {
        if self.buf.capacity() - self.buf.len() >= want || self.buf.try_reclaim(want) {
            Room::Ready
        } else {
            Room::Grow(self.buf.len() + want)
        }
    }

    /// The bytes held once `room` is carried out (`in_frame`: a frame is
    /// partly decoded, so a replaced allocation may stay pinned).
    pub(crate) fn held_after(&self, room: Room, in_frame: bool) -> usize {
        match room {
            Room::Ready => self.alloc + self.pinned,
            Room::Grow(n) => n + self.pinned + if in_frame { self.alloc } else { 0 },
        }
    }

    /// Carries out `room`: a new allocation of its size, with the
    /// undecoded bytes moved over.
    pub(crate) fn make_room(&mut self, room: Room, in_frame: bool) {
        if let Room::Grow(n) = room {
            self.replace(n, in_frame);
        }
    }

    /// The frame that was in progress when allocations were replaced has
    /// completed (or none was): nothing refers to them any more. Only that
    /// frame can: every allocation is replaced between reads, the
    /// connection drops each command's arguments once it has run, and the
    /// decoder copies a large one that would pin a replaced buffer.
    pub(crate) fn frame_done(&mut self) {
        self.pinned = 0;
    }

    /// Gives back an empty buffer whose allocation is over `keep` bytes,
    /// for one of `initial`; not while a frame is in progress, whose
    /// arguments so far may still be slices of it (giving it back would
    /// free nothing, and only hide it from the charge).
    pub(crate) fn give_back(&mut self, keep: usize, initial: usize, in_frame: bool) {
        if self.buf.is_empty() && self.alloc > keep && !in_frame {
            self.replace(initial, false);
        }
    }

    fn replace(&mut self, n: usize, in_frame: bool) {
        let mut fresh = BytesMut::with_capacity(n);
        fresh.extend_from_slice(&self.buf);
        if in_frame {
            self.pinned += self.alloc;
        }
        self.alloc = fresh.capacity();
        self.buf = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    /// Reads `n` bytes into `rb` the way the server does.
    fn read(rb: &mut ReadBuffer, n: usize, in_frame: bool) -> Room {
        let room = rb.room_for(n);
        rb.make_room(room, in_frame);
        assert!(rb.buf.capacity() - rb.buf.len() >= n);
        rb.buf.extend_from_slice(&vec![b'r'; n]);
        room
    }

    #[test]
    fn a_consumed_buffer_is_still_counted_and_its_room_reused() {
        let mut rb = ReadBuffer::with_capacity(16 * KIB);
        // A large token grows it to 1 MiB, then it is split off.
        while rb.buf.len() < (1 << 20) {
            read(&mut rb, 32 * KIB, false);
        }
        assert_eq!(rb.alloc(), 1 << 20);
        let start = rb.buf.as_ptr();
        drop(rb.buf.split_to(rb.buf.len()));
        assert!(rb.buf.capacity() < 32 * KIB, "capacity alone hides it");
        assert_eq!(rb.held_after(Room::Ready, false), 1 << 20);
        // The next reads reclaim the same allocation.
        assert_eq!(read(&mut rb, 32 * KIB, false), Room::Ready);
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
        read(&mut rb, 10 * KIB, false);
        let room = rb.room_for(32 * KIB);
        assert_eq!(room, Room::Grow(42 * KIB), "undecoded bytes plus the read");
        assert_eq!(rb.alloc(), 16 * KIB, "nothing allocated yet");
        assert_eq!(rb.held_after(room, false), 42 * KIB);
        rb.make_room(room, false);
        assert_eq!(rb.alloc(), 42 * KIB);
        assert_eq!(rb.buf.capacity(), 42 * KIB);
        assert_eq!(&rb.buf[..], &vec![b'r'; 10 * KIB][..], "data moved over");
        // Shared with an argument of the frame in progress, it cannot be
        // reclaimed: the new one holds what is left plus the read.
        let _arg = rb.buf.split_to(5 * KIB).freeze();
        assert_eq!(rb.room_for(40 * KIB), Room::Grow(45 * KIB));
    }

    #[test]
    fn an_allocation_pinned_by_a_partial_frame_stays_counted_until_it_completes() {
        let mut rb = ReadBuffer::with_capacity(16 * KIB);
        read(&mut rb, 16 * KIB, false);
        let old = rb.buf.as_ptr() as usize..rb.buf.as_ptr() as usize + 16 * KIB;
        // The decoder keeps an argument of the frame in progress.
        let arg = rb.buf.split_to(100).freeze();
        let room = rb.room_for(16 * KIB);
        let Room::Grow(new) = room else {
            panic!("shared: no reclaim")
        };
        assert_eq!(rb.held_after(room, true), new + 16 * KIB);
        rb.make_room(room, true);
        assert!(old.contains(&(arg.as_ptr() as usize)), "still alive");
        assert_eq!(rb.held_after(Room::Ready, true), new + 16 * KIB);
        // The frame completes and its arguments are dropped.
        drop(arg);
        rb.frame_done();
        assert_eq!(rb.held_after(Room::Ready, false), new);
    }

    /// The decoder over a read buffer driven as the server drives it, on a
    /// pipeline whose reads end inside frames: what is held stays near one
    /// read, because each replaced allocation is released with the frame
    /// that pinned it.
    #[test]
    fn a_pipeline_split_mid_frame_holds_about_one_read() {
        use crate::resp::{Decoder, Limits};
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
        let mut rb = ReadBuffer::with_capacity(16 * KIB);
        let mut d = Decoder::new(Limits::default());
        let mut args = Vec::new();
        let (mut commands, mut grown, mut most) = (0, 0, 0);
        // Reads of 16 KiB + 1 byte never end on a frame boundary for long.
        for chunk in input.chunks(16 * KIB + 1) {
            let in_frame = d.in_frame();
            if !in_frame {
                rb.frame_done();
            }
            let room = rb.room_for(chunk.len());
            most = most.max(rb.held_after(room, in_frame));
            grown += usize::from(room != Room::Ready);
            rb.make_room(room, in_frame);
            rb.buf.extend_from_slice(chunk);
            while d.decode_command(&mut rb.buf, &mut args).unwrap().is_some() {
                args.clear();
                rb.frame_done();
                commands += 1;
            }
        }
        assert_eq!(commands, 5000);
        assert!(
            grown > 100,
            "reads ending mid-frame replace the buffer ({grown})"
        );
        assert!(most <= 3 * (16 * KIB + 1), "held at most {most} bytes");
    }
}
