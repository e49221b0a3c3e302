//! RESP codec, sans-IO: bytes in, frames out; replies in, bytes out.
//!
//! The [`Decoder`] is incremental: it consumes complete tokens (a header
//! line, or a bulk body) from the front of the caller's buffer and keeps the
//! partially built frame in its own state, so a frame that arrives one byte at
//! a time costs the same as one that arrives whole. It accepts RESP2 (`+ - : $
//! *`) and inline commands (a line of space-separated words, as telnet sends).
//!
//! Every allocation is bounded by a [`Limits`] field checked *before* the
//! allocation: a bulk length is compared with `max_bulk_len` and the remaining
//! frame budget before a byte of it is buffered; an array header is compared
//! with the element budget and never pre-allocates more than
//! [`PREALLOC_ELEMENTS`] slots; nesting deeper than `max_depth` is refused at
//! the header that would exceed it; a line (header or inline command) longer
//! than its limit is refused as soon as that many bytes are buffered without a
//! line end. After any [`ProtocolError`] the stream position is unknown; the
//! server replies with the error and closes the connection, as Redis does.
//!
//! Large bulk strings (at least [`DIRECT_BULK_MIN`] bytes) whose body is
//! not yet buffered are received into a buffer of their own, allocated at
//! exactly the body's size once its header is checked: the adapter reads the
//! missing bytes straight into it ([`Decoder::direct_body`]), so a 16 KiB
//! value is neither moved around the read buffer while it arrives nor copied
//! out of it afterwards (the decoded argument *is* that buffer; redis does
//! the same for its large arguments). The header's length has passed the
//! same limits before that allocation as before any buffering.
//!
//! The [`Reply`] encoder writes RESP2 or RESP3 (chosen per connection by
//! `HELLO`): `Null` is `$-1` in RESP2 and `_` in RESP3, a `Map` is a flat
//! array in RESP2 and `%` in RESP3.

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};

/// Array slots reserved up front at most, whatever the header claims.
pub const PREALLOC_ELEMENTS: usize = 64;

/// Bulk strings at least this long are received into a buffer of their own
/// when their body is not yet in the read buffer (see the module docs).
/// 8 KiB: below that, copying the body out of the read buffer costs less
/// than the extra `read(2)` that stops exactly at the body's end.
pub const DIRECT_BULK_MIN: usize = 8 << 10;
/// Most allocated for a direct body before its bytes arrive. A larger
/// body's buffer doubles as it fills (up to its exact size), so a header
/// alone cannot claim more than this of the server's buffer budget.
pub const DIRECT_PREALLOC_MAX: usize = 1 << 20;

/// Slots a connection's scratch vectors (the fast path's argument
/// positions, the server's argument vector) keep between commands (1024:
/// every ordinary command fits). A command with more (up to
/// `max_elements`, 1 Mi: 16 MiB of positions, 32 MiB of arguments) frees
/// them once it is done with them, so they do not stay with the
/// connection outside its buffer budget.
pub(crate) const KEEP_SCRATCH: usize = 1024;

/// Empties `v`, and frees it if it holds room for more than
/// [`KEEP_SCRATCH`] items.
pub(crate) fn reset_scratch<T>(v: &mut Vec<T>) {
    if v.capacity() > KEEP_SCRATCH {
        *v = Vec::new();
    } else {
        v.clear();
    }
}

/// Longest type/length header line: `$` + sign + 20 digits + CRLF fits in 32.
const MAX_HEADER_LINE: usize = 32;

/// Hard limits of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string. 16 MiB: twice the default maximum value size, so
    /// a refused put gets a clear "too large" reply rather than a protocol error.
    pub max_bulk_len: usize,
    /// Most elements in one frame, all arrays counted (1 Mi; bounds the
    /// `Frame` structs a frame can create).
    pub max_elements: usize,
    /// Deepest array nesting. Commands are flat arrays (depth 1); 8 leaves room
    /// for decoding replies in tests and tools.
    pub max_depth: usize,
    /// Longest inline command or simple-string line (64 KiB, as Redis).
    pub max_inline_len: usize,
    /// Most bytes in one frame, headers and bodies (64 MiB): the per-connection
    /// buffering bound.
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bulk_len: 16 << 20,
            max_elements: 1 << 20,
            max_depth: 8,
            max_inline_len: 64 << 10,
            max_frame_bytes: 64 << 20,
        }
    }
}

/// A decoded RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+text`
    Simple(Bytes),
    /// `-text`
    Error(Bytes),
    /// `:n`
    Integer(i64),
    /// `$n` and n bytes
    Bulk(Bytes),
    /// `$-1` or `*-1`
    Null,
    /// `*n` and n frames
    Array(Vec<Frame>),
}

/// Why the input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A length other than -1 (null) below zero.
    #[error("invalid {kind} length {len}")]
    NegativeLength {
        /// `bulk` or `multibulk`.
        kind: &'static str,
        /// The length given.
        len: i64,
    },
    /// A bulk string longer than allowed.
    #[error("invalid bulk length {len} (limit {max})")]
    BulkTooLong {
        /// Length given.
        len: i64,
        /// Limit.
        max: usize,
    },
    /// More array elements in one frame than allowed.
    #[error("invalid multibulk length {len} (at most {max} elements per frame)")]
    TooManyElements {
        /// Length given.
        len: i64,
        /// Limit.
        max: usize,
    },
    /// Arrays nested deeper than allowed.
    #[error("arrays nested deeper than {max}")]
    TooDeep {
        /// Limit.
        max: usize,
    },
    /// The frame would exceed the byte budget.
    #[error("frame exceeds {max} bytes")]
    FrameTooLarge {
        /// Limit.
        max: usize,
    },
    /// An inline command with a quote not closed, or not followed by a
    /// space or the line's end.
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    /// An inline command with no line end within the limit.
    #[error("too big inline request (limit {max} bytes)")]
    InlineTooLong {
        /// Limit.
        max: usize,
    },
    /// A header line with no line end within 32 bytes (sign, 20 digits, CRLF fit).
    #[error("header line too long")]
    HeaderTooLong,
    /// A length or integer that is not a decimal number.
    #[error("invalid number in header")]
    BadNumber,
    /// A bulk body not followed by CRLF.
    #[error("bulk string not terminated by CRLF")]
    MissingCrlf,
    /// A byte that starts no RESP type inside an array.
    #[error("expected a RESP type byte, got {0:#04x}")]
    UnexpectedByte(u8),
}

#[derive(Debug)]
struct Partial {
    want: usize,
    items: Vec<Frame>,
    /// Items before this one own their bytes (see [`Decoder::unpin`]).
    unpinned: usize,
}

/// Incremental RESP decoder; one per connection.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    stack: Vec<Partial>,
    pending_bulk: Option<usize>,
    /// The buffer of a large pending bulk body, with capacity for exactly
    /// the body and its CRLF.
    direct: Option<BytesMut>,
    /// Addresses of the direct bodies in the frame being decoded.
    direct_done: Vec<usize>,
    frame_bytes: usize,
    frame_elements: usize,
    /// Bytes copied by [`Decoder::unpin`] for the frame in progress.
    unpinned_bytes: usize,
    /// Argument positions found by the command fast path (reused).
    spans: Vec<(usize, usize)>,
}

/// What [`Decoder::decode_command`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A command (a non-empty array of bulk strings): its arguments are in
    /// the caller's vector.
    Args,
    /// Any other frame; the command layer answers it with an error.
    Other(Frame),
}

/// A `*N` or `$N` header with plain decimal digits at `at`: returns `N` and
/// the position after its CRLF. `None` for anything else (a sign, a null,
/// an overlong or incomplete line), which the general decoder then handles.
fn fast_header(buf: &[u8], at: usize, kind: u8) -> Option<(usize, usize)> {
    let line = buf.get(at..)?;
    let line = &line[..line.len().min(MAX_HEADER_LINE)];
    if line.first() != Some(&kind) {
        return None;
    }
    let mut n = 0usize;
    let mut i = 1;
    while let Some(d) = line.get(i).filter(|b| b.is_ascii_digit()) {
        n = n.checked_mul(10)?.checked_add(usize::from(d - b'0'))?;
        i += 1;
    }
    // A leading zero ("$04") is left to the general decoder, which refuses it.
    let canonical = i == 2 || line.get(1) != Some(&b'0');
    (i > 1 && canonical && line.get(i..i + 2) == Some(b"\r\n")).then_some((n, at + i + 2))
}

fn find_crlf(buf: &[u8], limit: usize) -> Option<usize> {
    let window = &buf[..buf.len().min(limit)];
    memchr::memmem::find(window, b"\r\n")
}

/// A decimal integer as Redis reads one in a header: an optional `-`, then
/// digits without a leading zero (`0` alone is zero). `+5`, `05` and `-0`
/// are refused, as redis-server refuses them.
fn parse_i64(digits: &[u8]) -> Result<i64, ProtocolError> {
    let magnitude = digits.strip_prefix(b"-").unwrap_or(digits);
    let canonical = match magnitude {
        [b'0'] => digits.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return Err(ProtocolError::BadNumber);
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(ProtocolError::BadNumber)
}

/// How many bytes a full direct body of `want` bytes (body and CRLF) grows
/// by before the next read: it doubles (a body over
/// [`DIRECT_PREALLOC_MAX`] is allocated as it arrives), to at most what is
/// still missing; nothing while it has room or is complete.
fn direct_growth(body: &BytesMut, want: usize) -> usize {
    if body.len() >= body.capacity() && body.len() < want {
        (want - body.len()).min(body.capacity().max(1))
    } else {
        0
    }
}

/// Copies the bulk strings in `frame` that are not direct bodies (see
/// [`Decoder::unpin`]); returns the bytes copied.
fn unpin_frame(frame: &mut Frame, direct: &[usize]) -> usize {
    match frame {
        Frame::Bulk(b) if !direct.contains(&(b.as_ptr() as usize)) => {
            *b = Bytes::copy_from_slice(b);
            b.len()
        }
        Frame::Array(items) => items.iter_mut().map(|f| unpin_frame(f, direct)).sum(),
        _ => 0,
    }
}

/// An argument of a frame that spanned reads, made safe to keep: a large
/// one that is the only reference to a read buffer the connection has
/// since replaced (reallocated to make room) would pin that whole buffer if
/// stored, so it is copied. Direct bodies (`direct`: their addresses) are
/// exactly sized and kept as they are. Everything else shares a buffer with
/// its neighbours and is copied when stored anyway (see the commands'
/// `owned`, which relies on this: a unique large argument is one of ours).
fn detach(b: Bytes, direct: &[usize]) -> Bytes {
    if b.len() >= DIRECT_BULK_MIN && b.is_unique() && !direct.contains(&(b.as_ptr() as usize)) {
        Bytes::copy_from_slice(&b)
    } else {
        b
    }
}

impl Decoder {
    /// A decoder with the given limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            stack: Vec::new(),
            pending_bulk: None,
            direct: None,
            direct_done: Vec::new(),
            frame_bytes: 0,
            frame_elements: 0,
            unpinned_bytes: 0,
            spans: Vec::new(),
        }
    }

    /// Decode the next command. Like [`Decoder::decode`], but a non-empty
    /// array of bulk strings (every well-formed command) lands in `args`
    /// (cleared first) instead of a [`Frame`].
    ///
    /// Fast path: when no frame is partly decoded and a whole command of
    /// plain `*N`/`$N` headers is already in `buf`, it is checked against the
    /// same limits in one pass, split off the buffer once, and its arguments
    /// are slices of that split. Anything else (partial input, inline
    /// commands, other types, anything the limits refuse) goes through
    /// [`Decoder::decode`], which alone reports errors; the fast path
    /// consumes nothing unless it succeeds, so both give the same result.
    pub fn decode_command(
        &mut self,
        buf: &mut BytesMut,
        args: &mut Vec<Bytes>,
    ) -> Result<Option<Command>, ProtocolError> {
        if !self.in_frame() {
            if let Some(total) = self.scan_command(buf) {
                let frame = buf.split_to(total).freeze();
                args.clear();
                args.extend(self.spans.iter().map(|&(a, b)| frame.slice(a..b)));
                reset_scratch(&mut self.spans);
                return Ok(Some(Command::Args));
            }
            reset_scratch(&mut self.spans);
        }
        // A request that is an empty or null array (`*0`, `*-1`) is no
        // command, and gets no reply (as in redis): a reply would be taken
        // as the answer to the next command.
        let frame = loop {
            let top_array = !self.in_frame() && buf.first() == Some(&b'*');
            match self.decode(buf)? {
                Some(Frame::Null) if top_array => {}
                Some(Frame::Array(items)) if top_array && items.is_empty() => {}
                frame => break frame,
            }
        };
        let direct = if frame.is_some() {
            std::mem::take(&mut self.direct_done)
        } else {
            Vec::new()
        };
        match frame {
            None => Ok(None),
            Some(Frame::Array(items))
                if !items.is_empty() && items.iter().all(|f| matches!(f, Frame::Bulk(_))) =>
            {
                args.clear();
                args.extend(items.into_iter().filter_map(|f| match f {
                    Frame::Bulk(b) => Some(detach(b, &direct)),
                    _ => None,
                }));
                Ok(Some(Command::Args))
            }
            Some(other) => Ok(Some(Command::Other(other))),
        }
    }

    /// The length of a complete command at the front of `buf` that the
    /// general decoder would accept as a flat array of bulk strings, with
    /// its argument spans in `self.spans`; `None` if that is not certain.
    fn scan_command(&mut self, buf: &[u8]) -> Option<usize> {
        self.spans.clear();
        let (n, mut pos) = fast_header(buf, 0, b'*')?;
        if n == 0 || n > self.limits.max_elements || self.limits.max_depth == 0 {
            return None;
        }
        for _ in 0..n {
            let (len, start) = fast_header(buf, pos, b'$')?;
            if len > self.limits.max_bulk_len {
                return None;
            }
            let end = start.checked_add(len)?;
            if buf.get(end..end.checked_add(2)?)? != b"\r\n" {
                return None;
            }
            pos = end + 2;
            if pos > self.limits.max_frame_bytes {
                return None;
            }
            self.spans.push((start, end));
        }
        Some(pos)
    }

    /// While a large bulk body is arriving: its own buffer, whose spare
    /// capacity is exactly the bytes still missing (body and CRLF). An
    /// adapter reads into this rather than its read buffer, so the body is
    /// never copied and no read takes bytes of the next frame. Bytes that
    /// land in the read buffer instead are moved over by the next `decode`,
    /// and bytes written past the body go back to the read buffer, so any
    /// way of filling it is correct.
    pub fn direct_body(&mut self) -> Option<&mut BytesMut> {
        let want = self.pending_bulk? + 2;
        let body = self.direct.as_mut()?;
        let more = direct_growth(body, want);
        if more > 0 {
            // Exactly `more`: `BytesMut::reserve` would double the
            // allocation, and spare room past the body would let a read
            // take the next frame's bytes into it, and the value keep an
            // allocation larger than itself. Both conversions keep the
            // allocation (the body is never split before it completes;
            // `Bytes` is the public way from a `Vec` with spare room).
            let mut v = Vec::from(std::mem::take(body));
            v.reserve_exact(more);
            *body = BytesMut::from(Bytes::from(v));
        }
        Some(body)
    }

    /// Whether a large bulk body is arriving: the next read goes into
    /// [`Decoder::direct_body`], not the read buffer.
    pub fn direct_in_progress(&self) -> bool {
        self.pending_bulk.is_some() && self.direct.is_some()
    }

    /// Bytes allocated for a large bulk body in progress (the adapter
    /// charges them to its memory budget with its read buffer).
    pub fn direct_capacity(&self) -> usize {
        self.direct.as_ref().map_or(0, BytesMut::capacity)
    }

    /// What [`Decoder::direct_capacity`] will be once [`Decoder::direct_body`]
    /// has made room for the next read: the adapter charges this before
    /// the allocation is made.
    pub fn direct_capacity_for_read(&self) -> usize {
        match (&self.direct, self.pending_bulk) {
            (Some(body), Some(len)) => body.capacity() + direct_growth(body, len + 2),
            (Some(body), None) => body.capacity(),
            (None, _) => 0,
        }
    }

    /// Whether a frame is partly decoded (a truncated frame at EOF).
    pub fn in_frame(&self) -> bool {
        !self.stack.is_empty() || self.pending_bulk.is_some()
    }

    /// Gives the frame in progress its own copies of the arguments decoded
    /// so far that are slices of the read buffer, each once; returns the
    /// bytes copied. Without this, a read that ends inside a frame leaves
    /// the read buffer shared with those slices, so the adapter can neither
    /// reuse its room nor free it when replacing it: a client sending one
    /// small argument per read would pin a whole read buffer with each.
    /// Direct bodies are exactly sized buffers of their own and are kept.
    pub fn unpin(&mut self) -> usize {
        let direct = &self.direct_done;
        let mut copied = 0;
        for partial in &mut self.stack {
            for item in &mut partial.items[partial.unpinned..] {
                copied += unpin_frame(item, direct);
            }
            partial.unpinned = partial.items.len();
        }
        self.unpinned_bytes += copied;
        copied
    }

    /// Memory the frame in progress holds outside the read buffer and the
    /// direct body: its copied arguments and its decoded items. The adapter
    /// charges it to its memory budget with them.
    pub fn partial_bytes(&self) -> usize {
        let items: usize = self.stack.iter().map(|p| p.items.capacity()).sum();
        self.unpinned_bytes + items * std::mem::size_of::<Frame>()
    }

    fn charge_bytes(&mut self, n: usize) -> Result<(), ProtocolError> {
        self.frame_bytes = self.frame_bytes.saturating_add(n);
        if self.frame_bytes > self.limits.max_frame_bytes {
            return Err(ProtocolError::FrameTooLarge {
                max: self.limits.max_frame_bytes,
            });
        }
        Ok(())
    }

    /// Decode the next complete frame from the front of `buf`, consuming what
    /// it uses. `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let value = if let Some(len) = self.pending_bulk {
                if self.direct.is_some() {
                    match self.fill_direct(len, buf)? {
                        Some(data) => Frame::Bulk(data),
                        None => return Ok(None),
                    }
                } else {
                    if buf.len() < len + 2 {
                        return Ok(None);
                    }
                    if &buf[len..len + 2] != b"\r\n" {
                        return Err(ProtocolError::MissingCrlf);
                    }
                    let data = buf.split_to(len).freeze();
                    buf.advance(2);
                    self.pending_bulk = None;
                    Frame::Bulk(data)
                }
            } else {
                let Some(&first) = buf.first() else {
                    return Ok(None);
                };
                if self.stack.is_empty() && !matches!(first, b'+' | b'-' | b':' | b'$' | b'*') {
                    match self.decode_inline(buf)? {
                        None => return Ok(None),
                        Some(None) => continue, // blank line
                        Some(Some(f)) => return Ok(Some(f)),
                    }
                }
                if !matches!(first, b'+' | b'-' | b':' | b'$' | b'*') {
                    // Inside an array (an inline command is only at the
                    // top). Checked before the line is sliced: one that
                    // starts with its CRLF has no type byte to skip.
                    return Err(ProtocolError::UnexpectedByte(first));
                }
                let limit = match first {
                    b'+' | b'-' => self.limits.max_inline_len,
                    _ => MAX_HEADER_LINE,
                };
                let Some(end) = find_crlf(buf, limit) else {
                    if buf.len() >= limit {
                        return Err(match first {
                            b'+' | b'-' => ProtocolError::InlineTooLong { max: limit },
                            _ => ProtocolError::HeaderTooLong,
                        });
                    }
                    return Ok(None);
                };
                self.charge_bytes(end + 2)?;
                let line = buf.split_to(end + 2);
                let body = &line[1..end];
                match first {
                    b'+' => Frame::Simple(Bytes::copy_from_slice(body)),
                    b'-' => Frame::Error(Bytes::copy_from_slice(body)),
                    b':' => Frame::Integer(parse_i64(body)?),
                    b'$' => match self.bulk_header(parse_i64(body)?)? {
                        Some(len) => {
                            self.pending_bulk = Some(len);
                            if len >= DIRECT_BULK_MIN && buf.len() < len + 2 {
                                // The loop moves what is buffered already.
                                self.direct = Some(BytesMut::with_capacity(
                                    (len + 2).min(DIRECT_PREALLOC_MAX),
                                ));
                            }
                            continue;
                        }
                        None => Frame::Null,
                    },
                    b'*' => match self.array_header(parse_i64(body)?)? {
                        Some(0) => Frame::Array(Vec::new()),
                        Some(n) => {
                            self.stack.push(Partial {
                                want: n,
                                items: Vec::with_capacity(n.min(PREALLOC_ELEMENTS)),
                                unpinned: 0,
                            });
                            continue;
                        }
                        None => Frame::Null,
                    },
                    other => return Err(ProtocolError::UnexpectedByte(other)),
                }
            };
            if let Some(frame) = self.complete(value) {
                self.frame_bytes = 0;
                self.frame_elements = 0;
                self.unpinned_bytes = 0;
                return Ok(Some(frame));
            }
        }
    }

    /// Move what `buf` holds of the direct body in; the body once it and
    /// its CRLF are complete.
    fn fill_direct(
        &mut self,
        len: usize,
        buf: &mut BytesMut,
    ) -> Result<Option<Bytes>, ProtocolError> {
        let Some(body) = self.direct.as_mut() else {
            return Ok(None);
        };
        if body.len() > len + 2 {
            // Written past its spare capacity: the excess is the next
            // frame's, so it goes back in front of the read buffer.
            let mut excess = body.split_off(len + 2);
            excess.extend_from_slice(buf);
            *buf = excess;
        }
        let missing = len + 2 - body.len();
        let take = missing.min(buf.len());
        body.extend_from_slice(&buf[..take]);
        buf.advance(take);
        if take < missing {
            return Ok(None);
        }
        if &body[len..] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        body.truncate(len);
        self.pending_bulk = None;
        let body = self.direct.take().map(BytesMut::freeze);
        if let Some(b) = &body {
            self.direct_done.push(b.as_ptr() as usize);
        }
        Ok(body)
    }

    /// Validate a bulk length; `None` for the null bulk.
    fn bulk_header(&mut self, len: i64) -> Result<Option<usize>, ProtocolError> {
        if len == -1 {
            return Ok(None);
        }
        if len < 0 {
            return Err(ProtocolError::NegativeLength { kind: "bulk", len });
        }
        let n = usize::try_from(len)
            .ok()
            .filter(|n| *n <= self.limits.max_bulk_len)
            .ok_or(ProtocolError::BulkTooLong {
                len,
                max: self.limits.max_bulk_len,
            })?;
        self.charge_bytes(n + 2)?;
        Ok(Some(n))
    }

    /// Validate an array header; `None` for the null array.
    fn array_header(&mut self, len: i64) -> Result<Option<usize>, ProtocolError> {
        if len == -1 {
            return Ok(None);
        }
        if len < 0 {
            return Err(ProtocolError::NegativeLength {
                kind: "multibulk",
                len,
            });
        }
        let remaining = self.limits.max_elements - self.frame_elements;
        let n = usize::try_from(len)
            .ok()
            .filter(|n| *n <= remaining)
            .ok_or(ProtocolError::TooManyElements {
                len,
                max: self.limits.max_elements,
            })?;
        if n > 0 && self.stack.len() >= self.limits.max_depth {
            return Err(ProtocolError::TooDeep {
                max: self.limits.max_depth,
            });
        }
        self.frame_elements += n;
        Ok(Some(n))
    }

    /// Fold a finished value into the arrays being built; returns the
    /// top-level frame once it is complete.
    fn complete(&mut self, mut value: Frame) -> Option<Frame> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Some(value);
            };
            top.items.push(value);
            if top.items.len() < top.want {
                return None;
            }
            let done = self.stack.pop()?;
            value = Frame::Array(done.items);
        }
    }

    /// An inline command line. `Some(None)` for a blank line.
    fn decode_inline(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Option<Frame>>, ProtocolError> {
        let max = self.limits.max_inline_len;
        let window = &buf[..buf.len().min(max)];
        let Some(nl) = memchr::memchr(b'\n', window) else {
            if buf.len() >= max {
                return Err(ProtocolError::InlineTooLong { max });
            }
            return Ok(None);
        };
        let line = buf.split_to(nl + 1).freeze();
        let end = if nl > 0 && line[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        let text = line.slice(..end);
        // Plain words are slices of the line; quotes, and the bytes where
        // redis's splitting differs from splitting at whitespace, take the
        // full parser.
        let words: Vec<Frame> = if text
            .iter()
            .any(|b| matches!(b, b'"' | b'\'' | 0 | 0x0b | 0x0c))
        {
            split_quoted(&text)?
                .into_iter()
                .map(|w| Frame::Bulk(Bytes::from(w)))
                .collect()
        } else {
            text.split(|b| is_space(*b))
                .filter(|w| !w.is_empty())
                .map(|w| Frame::Bulk(text.slice_ref(w)))
                .collect()
        };
        if words.is_empty() {
            return Ok(Some(None));
        }
        Ok(Some(Some(Frame::Array(words))))
    }
}

/// Whitespace between inline arguments (C's `isspace`, as redis uses).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Splits an inline command line into arguments as redis does
/// (`sdssplitargs`): words separated by whitespace; in double quotes,
/// `\xHH` and `\n`, `\r`, `\t`, `\b`, `\a` escapes (any other escaped
/// character stands for itself); in single quotes, only `\'`. A closing
/// quote must be followed by whitespace or the end of the line. A NUL
/// byte ends the line (redis, reading the line as a C string, does not
/// see the line's end past it and waits for more input). Words are
/// separated by any whitespace, but end only at a space, tab, CR or LF.
fn split_quoted(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let line = match memchr::memchr(0, line) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let mut words = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i == line.len() {
            return Ok(words);
        }
        let mut word = Vec::new();
        // The quote being read (b'"' or b'\''), if any.
        let mut quote = None;
        loop {
            let Some(&c) = line.get(i) else {
                if quote.is_some() {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                break;
            };
            match quote {
                Some(b'"') if c == b'\\' && line.get(i + 1) == Some(&b'x') => {
                    let digit = |at: usize| line.get(at).and_then(|d| hex(*d));
                    if let (Some(h), Some(l)) = (digit(i + 2), digit(i + 3)) {
                        word.push(h << 4 | l);
                        i += 4;
                    } else {
                        word.push(b'x');
                        i += 2;
                    }
                    continue;
                }
                Some(b'"') if c == b'\\' && i + 1 < line.len() => {
                    word.push(match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    i += 2;
                    continue;
                }
                Some(b'\'') if c == b'\\' && line.get(i + 1) == Some(&b'\'') => {
                    word.push(b'\'');
                    i += 2;
                    continue;
                }
                Some(q) if c == q => {
                    if line.get(i + 1).is_some_and(|n| !is_space(*n)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                }
                Some(_) => word.push(c),
                None if matches!(c, b' ' | b'\t' | b'\r' | b'\n') => break,
                None if c == b'"' || c == b'\'' => quote = Some(c),
                None => word.push(c),
            }
            i += 1;
        }
        words.push(word);
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// RESP2 (the default).
    #[default]
    Resp2,
    /// RESP3 (after `HELLO 3`).
    Resp3,
}

/// A reply to encode.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`-style status (static text for the common replies, so they
    /// cost no allocation).
    Simple(Cow<'static, str>),
    /// `-ERR ...`; the text must include the error code (`ERR`, `WRONGTYPE`, ...).
    Error(String),
    /// Integer.
    Integer(i64),
    /// Binary-safe string.
    Bulk(Bytes),
    /// Text meant for people (INFO): a RESP3 verbatim string of format
    /// `txt`, as redis sends it; a bulk string in RESP2.
    Verbatim(Bytes),
    /// Absent value.
    Null,
    /// Array of replies.
    Array(Vec<Reply>),
    /// Key-value pairs (RESP3 map; flat array in RESP2).
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    /// `+OK`
    pub fn ok() -> Self {
        Reply::Simple(Cow::Borrowed("OK"))
    }

    /// `-ERR <msg>`
    pub fn err(msg: impl std::fmt::Display) -> Self {
        Reply::Error(format!("ERR {msg}"))
    }

    /// Bulk string from text.
    pub fn text(s: impl Into<String>) -> Self {
        Reply::Bulk(Bytes::from(s.into()))
    }
}

/// Where encoded replies go: a plain buffer (every byte copied), or an
/// [`Output`], which keeps large bulk strings by reference.
pub trait Sink {
    /// Append bytes.
    fn push_slice(&mut self, bytes: &[u8]);
    /// Append a bulk string's body (a stored value, usually).
    fn push_value(&mut self, value: &Bytes) {
        self.push_slice(value);
    }
}

impl Sink for BytesMut {
    fn push_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Bulk strings at least this long are kept by reference in an [`Output`]
/// rather than copied (4 KiB: below that the copy costs less than the extra
/// part of a vectored write).
pub const SHARED_BULK_MIN: usize = 4 << 10;

/// Encoded replies waiting to be written. Small pieces are copied into one
/// buffer; a bulk string of at least [`SHARED_BULK_MIN`] bytes is kept as
/// the `Bytes` it came in (for a GET, the value the cache holds), so a large
/// value is never copied on its way out: the adapter writes the parts with
/// vectored writes (it is a [`Buf`] whose chunks are the parts in order).
/// For 16 KiB GETs the copy into one reply buffer was about 15 % of the
/// server's CPU time.
///
/// A shared part is held until it is written, so a reply must share only
/// bytes that are not a slice of a connection's read buffer (which would
/// pin that buffer outside its memory budget): the command layer copies
/// any argument it sends back (`ECHO`).
#[derive(Debug, Default)]
pub struct Output {
    /// Parts before `tail`, none of them empty.
    /// Whether each part is copied bytes (from `tail`) rather than a value
    /// shared with its owner.
    parts: std::collections::VecDeque<(Bytes, bool)>,
    /// The bytes after `parts`, copied.
    tail: BytesMut,
    /// Bytes in `parts` and `tail` together.
    len: usize,
    /// Most bytes `tail` has held at once (see [`Output::peak`]).
    peak: usize,
}

impl Output {
    /// An empty output whose copy buffer starts with `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            parts: std::collections::VecDeque::new(),
            tail: BytesMut::with_capacity(capacity),
            len: 0,
            peak: 0,
        }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most bytes the copy buffer has held at once since this output was
    /// made: its allocation is at most about twice that, however much of
    /// it has been written since (writing advances the buffer's start, so
    /// its `capacity` no longer shows the allocation). For giving back a
    /// large one.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Bytes waiting to be written that nothing else holds: the copied
    /// ones, and shared parts whose only owner this is (for a GET, a
    /// value the cache has since replaced or dropped; or a large reply
    /// built for this connection alone). A value the cache still holds is
    /// left out: the cache's own bound counts it.
    pub fn held_alone(&self) -> usize {
        // A copied part shares its allocation with `tail`, so it never
        // looks unique; it is this output's alone all the same.
        let parts: usize = self
            .parts
            .iter()
            .filter(|(p, copied)| *copied || p.is_unique())
            .map(|(p, _)| p.len())
            .sum();
        parts + self.tail.len()
    }

    /// Drop everything not yet written.
    pub fn clear(&mut self) {
        self.parts.clear();
        self.tail.clear();
        self.len = 0;
    }
}

impl Sink for Output {
    fn push_slice(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        self.len += bytes.len();
        self.peak = self.peak.max(self.tail.len());
    }

    fn push_value(&mut self, value: &Bytes) {
        if value.len() < SHARED_BULK_MIN {
            self.push_slice(value);
            return;
        }
        if !self.tail.is_empty() {
            self.parts.push_back((self.tail.split().freeze(), true));
        }
        self.parts.push_back((value.clone(), false));
        self.len += value.len();
    }
}

impl Buf for Output {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&self.tail[..], |(p, _)| &p[..])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(
            n <= self.len,
            "advanced {n} bytes past the {} left",
            self.len
        );
        self.len -= n;
        while n > 0 {
            let Some((front, _)) = self.parts.front_mut() else {
                self.tail.advance(n);
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.parts.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let tail = (!self.tail.is_empty()).then_some(&self.tail[..]);
        let chunks = self.parts.iter().map(|(p, _)| &p[..]).chain(tail);
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(chunks) {
            *slot = std::io::IoSlice::new(chunk);
            n += 1;
        }
        n
    }
}

fn put_line(out: &mut impl Sink, prefix: u8, body: &[u8]) {
    out.push_slice(&[prefix]);
    out.push_slice(body);
    out.push_slice(b"\r\n");
}

/// Decimal digits of `n` at the end of `buf`; returns where they start.
fn digits(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

fn put_len(out: &mut impl Sink, prefix: u8, n: usize) {
    let mut buf = [0u8; 20];
    let at = digits(n as u64, &mut buf);
    put_line(out, prefix, &buf[at..]);
}

fn put_integer(out: &mut impl Sink, n: i64) {
    let mut buf = [0u8; 20];
    let at = digits(n.unsigned_abs(), &mut buf);
    out.push_slice(b":");
    if n < 0 {
        out.push_slice(b"-");
    }
    out.push_slice(&buf[at..]);
    out.push_slice(b"\r\n");
}

/// A status or error line, with CR and LF replaced by spaces so the text
/// cannot break framing.
fn put_text_line(out: &mut impl Sink, prefix: u8, s: &str) {
    out.push_slice(&[prefix]);
    let text = s.as_bytes();
    let mut start = 0;
    for (i, b) in text.iter().enumerate() {
        if *b == b'\r' || *b == b'\n' {
            out.push_slice(&text[start..i]);
            out.push_slice(b" ");
            start = i + 1;
        }
    }
    out.push_slice(&text[start..]);
    out.push_slice(b"\r\n");
}

/// Append the encoding of `reply` to `out`.
pub fn encode(reply: &Reply, proto: Protocol, out: &mut impl Sink) {
    match reply {
        Reply::Simple(s) => put_text_line(out, b'+', s),
        Reply::Error(s) => put_text_line(out, b'-', s),
        Reply::Integer(n) => put_integer(out, *n),
        Reply::Bulk(b) => {
            put_len(out, b'$', b.len());
            out.push_value(b);
            out.push_slice(b"\r\n");
        }
        Reply::Verbatim(b) => {
            match proto {
                Protocol::Resp2 => put_len(out, b'$', b.len()),
                Protocol::Resp3 => {
                    put_len(out, b'=', b.len() + 4);
                    out.push_slice(b"txt:");
                }
            }
            out.push_value(b);
            out.push_slice(b"\r\n");
        }
        Reply::Null => match proto {
            Protocol::Resp2 => out.push_slice(b"$-1\r\n"),
            Protocol::Resp3 => out.push_slice(b"_\r\n"),
        },
        Reply::Array(items) => {
            put_len(out, b'*', items.len());
            for item in items {
                encode(item, proto, out);
            }
        }
        Reply::Map(pairs) => {
            match proto {
                Protocol::Resp2 => put_len(out, b'*', pairs.len() * 2),
                Protocol::Resp3 => put_len(out, b'%', pairs.len()),
            }
            for (k, v) in pairs {
                encode(k, proto, out);
                encode(v, proto, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<Vec<Frame>, ProtocolError> {
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = d.decode(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn decodes_commands_and_types() {
        let frames = decode_all(
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n+OK\r\n-ERR x\r\n:-42\r\n$-1\r\n*-1\r\n*0\r\n",
        )
        .unwrap();
        assert_eq!(
            frames,
            vec![
                Frame::Array(vec![bulk("SET"), bulk("k"), bulk("")]),
                Frame::Simple(Bytes::from("OK")),
                Frame::Error(Bytes::from("ERR x")),
                Frame::Integer(-42),
                Frame::Null,
                Frame::Null,
                Frame::Array(vec![]),
            ]
        );
    }

    #[test]
    fn decodes_byte_by_byte() {
        let input = b"*2\r\n*1\r\n$5\r\nhe\r\nl\r\n:7\r\nPING x\r\n";
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(
            out,
            vec![
                Frame::Array(vec![
                    Frame::Array(vec![Frame::Bulk(Bytes::from("he\r\nl"))]),
                    Frame::Integer(7)
                ]),
                Frame::Array(vec![bulk("PING"), bulk("x")]),
            ]
        );
        assert!(!d.in_frame());
    }

    #[test]
    fn inline_commands_and_blank_lines() {
        assert_eq!(
            decode_all(b"\r\n  GET   key\r\nPING\n").unwrap(),
            vec![
                Frame::Array(vec![bulk("GET"), bulk("key")]),
                Frame::Array(vec![bulk("PING")]),
            ]
        );
    }

    #[test]
    fn bulk_length_2_pow_40_is_refused_before_allocating() {
        let err = decode_all(b"*1\r\n$1099511627776\r\n").unwrap_err();
        assert_eq!(
            err,
            ProtocolError::BulkTooLong {
                len: 1 << 40,
                max: 16 << 20
            }
        );
        // Also at top level and beyond i64.
        assert!(matches!(
            decode_all(b"$1099511627776\r\n"),
            Err(ProtocolError::BulkTooLong { .. })
        ));
        assert_eq!(
            decode_all(b"$99999999999999999999999\r\n"),
            Err(ProtocolError::BadNumber)
        );
    }

    #[test]
    fn negative_lengths_are_refused() {
        assert_eq!(
            decode_all(b"*1\r\n$-5\r\n"),
            Err(ProtocolError::NegativeLength {
                kind: "bulk",
                len: -5
            })
        );
        assert_eq!(
            decode_all(b"*-2\r\n"),
            Err(ProtocolError::NegativeLength {
                kind: "multibulk",
                len: -2
            })
        );
        assert_eq!(
            decode_all(b"*-9223372036854775808\r\n"),
            Err(ProtocolError::NegativeLength {
                kind: "multibulk",
                len: i64::MIN
            })
        );
    }

    #[test]
    fn truncated_frame_waits_and_reports_in_frame() {
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$10\r\nabc"[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(d.in_frame());
        // The buffered partial bulk is bounded by its declared length.
        assert!(buf.len() <= 10 + 2);
    }

    #[test]
    fn ten_megabyte_inline_is_refused_at_the_limit() {
        let limits = Limits::default();
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::new();
        let chunk = vec![b'a'; 8192];
        let mut fed = 0;
        let err = loop {
            buf.extend_from_slice(&chunk);
            fed += chunk.len();
            match d.decode(&mut buf) {
                Ok(None) => assert!(fed < 10 << 20, "never refused"),
                Ok(Some(f)) => panic!("decoded {f:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, ProtocolError::InlineTooLong { max: 64 << 10 });
        assert!(fed <= limits.max_inline_len + chunk.len());
    }

    #[test]
    fn ten_thousand_deep_nesting_is_refused() {
        let input = b"*1\r\n".repeat(10_000);
        assert_eq!(decode_all(&input), Err(ProtocolError::TooDeep { max: 8 }));
        // Depth 8 itself is fine.
        let mut ok = b"*1\r\n".repeat(8);
        ok.extend_from_slice(b":1\r\n");
        assert_eq!(decode_all(&ok).unwrap().len(), 1);
    }

    #[test]
    fn element_and_frame_budgets() {
        assert!(matches!(
            decode_all(b"*2000000\r\n"),
            Err(ProtocolError::TooManyElements { .. })
        ));
        let limits = Limits {
            max_frame_bytes: 100,
            ..Limits::default()
        };
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::from(&b"*2\r\n$50\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[b'x'; 50]);
        buf.extend_from_slice(b"\r\n$50\r\n");
        assert_eq!(
            d.decode(&mut buf),
            Err(ProtocolError::FrameTooLarge { max: 100 })
        );
        // Budgets reset per frame.
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::from(&b"$60\r\n"[..]);
        buf.extend_from_slice(&[b'x'; 60]);
        buf.extend_from_slice(b"\r\n$60\r\n");
        buf.extend_from_slice(&[b'y'; 60]);
        buf.extend_from_slice(b"\r\n");
        assert!(d.decode(&mut buf).unwrap().is_some());
        assert!(d.decode(&mut buf).unwrap().is_some());
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(
            decode_all(b"*1\r\n$3\r\nabcX\r\n"),
            Err(ProtocolError::MissingCrlf)
        );
        assert_eq!(
            decode_all(b"*1\r\n?x\r\n"),
            Err(ProtocolError::UnexpectedByte(b'?'))
        );
        assert_eq!(decode_all(b":abc\r\n"), Err(ProtocolError::BadNumber));
        // Numbers as redis-server reads them: no sign but `-`, no leading
        // zero, no negative zero.
        for bad in [
            &b"*1\r\n$04\r\nabcd\r\n"[..],
            b"*01\r\n$1\r\na\r\n",
            b"*1\r\n$+1\r\na\r\n",
            b"$-01\r\n",
            b":-0\r\n",
            b":00\r\n",
        ] {
            assert_eq!(
                decode_all(bad),
                Err(ProtocolError::BadNumber),
                "{}",
                String::from_utf8_lossy(bad)
            );
            // The command path reads headers on its own fast path first.
            assert_eq!(
                commands_in_chunks(bad, bad.len(), Limits::default()),
                Err(ProtocolError::BadNumber),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(decode_all(b":0\r\n"), Ok(vec![Frame::Integer(0)]));
        assert_eq!(decode_all(b":-10\r\n"), Ok(vec![Frame::Integer(-10)]));
        assert_eq!(decode_all(b"$0\r\n\r\n").map(|f| f.len()), Ok(1));
        let long = [b"*".as_slice(), &[b'1'; 40]].concat();
        assert_eq!(decode_all(&long), Err(ProtocolError::HeaderTooLong));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// Frames of headers with odd numbers (signs, zeros, empty), cut
        /// anywhere,
        /// never panics either decoder, and both agree on whether it is a
        /// protocol error: the command path's fast header reading accepts
        /// nothing the general decoder refuses.
        #[test]
        fn headers_decode_alike_on_both_paths(
            pieces in proptest::collection::vec(
                (
                    proptest::sample::select(&b"*$:"[..]),
                    proptest::sample::select(&["0", "1", "01", "-0", "+1", ""][..]),
                    proptest::sample::select(&["\r\n", "\r\na\r\n"][..]),
                ),
                0..8,
            ),
            chunk in 1usize..64,
        ) {
            let mut input = Vec::new();
            for (kind, number, end) in pieces {
                input.push(kind);
                input.extend_from_slice(number.as_bytes());
                input.extend_from_slice(end.as_bytes());
            }
            let general = decode_all(&input).map(|_| ());
            let command = commands_in_chunks(&input, chunk, Limits::default()).map(|_| ());
            proptest::prop_assert_eq!(general, command);
        }
    }

    /// Everything `decode` yields, as `decode_command` reports it.
    fn as_commands(frames: Vec<Frame>) -> Vec<Result<Vec<Bytes>, Frame>> {
        frames
            .into_iter()
            .map(|f| match f {
                Frame::Array(items)
                    if !items.is_empty() && items.iter().all(|i| matches!(i, Frame::Bulk(_))) =>
                {
                    Ok(items
                        .into_iter()
                        .map(|i| match i {
                            Frame::Bulk(b) => b,
                            _ => unreachable!(),
                        })
                        .collect())
                }
                other => Err(other),
            })
            .collect()
    }

    /// Feed `input` in chunks of `chunk` bytes through `decode_command`.
    fn commands_in_chunks(
        input: &[u8],
        chunk: usize,
        limits: Limits,
    ) -> Result<Vec<Result<Vec<Bytes>, Frame>>, ProtocolError> {
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::new();
        let mut args = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(c) = d.decode_command(&mut buf, &mut args)? {
                out.push(match c {
                    Command::Args => Ok(std::mem::take(&mut args)),
                    Command::Other(f) => Err(f),
                });
            }
        }
        Ok(out)
    }

    /// What an output alone holds: its copies (also those frozen ahead of
    /// a shared value), and shared values nothing else holds any more.
    #[test]
    fn an_output_counts_what_it_alone_holds() {
        let cached = Bytes::from(vec![b'c'; SHARED_BULK_MIN]);
        let built = Bytes::from(vec![b'b'; 2 * SHARED_BULK_MIN]);
        let mut out = Output::with_capacity(64);
        out.push_slice(b"*3\r\n");
        out.push_value(&cached);
        out.push_slice(b"\r\n");
        out.push_value(&Bytes::from(vec![b's'; 100]));
        out.push_value(&built);
        drop(built);
        let copied = out.len() - 3 * SHARED_BULK_MIN;
        assert_eq!(copied, 4 + 2 + 100);
        assert_eq!(out.held_alone(), copied + 2 * SHARED_BULK_MIN);
        // The cache lets go of its value: now only the reply holds it.
        drop(cached);
        assert_eq!(out.held_alone(), out.len());
    }

    #[test]
    fn the_fast_path_keeps_no_room_for_a_huge_commands_arguments() {
        let mut d = Decoder::new(Limits::default());
        let mut args = Vec::new();
        let mut wire = b"*5001\r\n$6\r\nEXISTS\r\n".to_vec();
        for _ in 0..5000 {
            wire.extend_from_slice(b"$1\r\nk\r\n");
        }
        // Complete: the fast path takes it.
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            d.decode_command(&mut buf, &mut args).unwrap(),
            Some(Command::Args)
        );
        assert_eq!(args.len(), 5001);
        assert!(d.spans.capacity() <= KEEP_SCRATCH, "{}", d.spans.capacity());
        // Incomplete: the fast path scans it and gives up.
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert_eq!(d.decode_command(&mut buf, &mut args).unwrap(), None);
        assert!(d.spans.capacity() <= KEEP_SCRATCH, "{}", d.spans.capacity());
    }

    #[test]
    fn command_fast_path_agrees_with_the_general_decoder() {
        let small = Limits {
            max_bulk_len: 8,
            max_elements: 3,
            max_frame_bytes: 40,
            ..Limits::default()
        };
        let inputs: &[&[u8]] = &[
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n*1\r\n$4\r\nPING\r\n",
            b"*2\r\n$3\r\nGET\r\n$5\r\na\r\nbc\r\n",
            b"*0\r\n*-1\r\n:5\r\n+OK\r\n",
            b"*2\r\n$3\r\nGET\r\n:1\r\n",
            b"*1\r\n*1\r\n$1\r\nx\r\n",
            b"*1\r\n$-1\r\n",
            b"*+1\r\n$+3\r\nGET\r\n*01\r\n$003\r\nGET\r\n",
            b"PING\r\n*1\r\n$4\r\nPING\r\n",
            b"*1\r\n$3\r\nabcX\r\n",
            b"*1\r\n$-5\r\n",
            b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n",
            b"*1\r\n$9\r\n123456789\r\n",
            b"*3\r\n$8\r\n12345678\r\n$8\r\n12345678\r\n$1\r\nx\r\n",
            b"*1\r\n$99999999999999999999999\r\n",
            b"*11111111111111111111111111111111111\r\n",
        ];
        for limits in [Limits::default(), small] {
            for input in inputs {
                let expected = {
                    let mut d = Decoder::new(limits);
                    let mut buf = BytesMut::from(*input);
                    let mut frames = Vec::new();
                    loop {
                        match d.decode(&mut buf) {
                            // As requests, `*0` and `*-1` are skipped (no
                            // input here has a top-level `$-1`).
                            Ok(Some(Frame::Null)) => {}
                            Ok(Some(Frame::Array(items))) if items.is_empty() => {}
                            Ok(Some(f)) => frames.push(f),
                            Ok(None) => break Ok(as_commands(frames)),
                            Err(e) => break Err(e),
                        }
                    }
                };
                for chunk in [1, 2, 3, 7, input.len()] {
                    let got = commands_in_chunks(input, chunk, limits);
                    // On an error, the commands before it are not compared
                    // (they were returned before the error surfaced).
                    match (&expected, &got) {
                        (Err(e), Err(g)) => assert_eq!(e, g, "{input:?} in chunks of {chunk}"),
                        _ => assert_eq!(expected, got, "{input:?} in chunks of {chunk}"),
                    }
                }
            }
        }
    }

    /// What the server does: each read of at most `chunk` bytes goes into
    /// the decoder's direct body while one is in progress (never past its
    /// spare capacity, like `read_buf`), otherwise into the read buffer;
    /// every command is decoded after each read. With `overfill`, reads
    /// into the body ignore its spare capacity (an adapter that gets it
    /// wrong must still decode correctly).
    fn commands_via_reads(
        input: &[u8],
        chunk: usize,
        limits: Limits,
        overfill: bool,
    ) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::new();
        let mut args = Vec::new();
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = match d.direct_body() {
                Some(body) => {
                    let spare = body.capacity() - body.len();
                    assert!(spare > 0, "a direct body in progress has room");
                    let n = if overfill { chunk } else { chunk.min(spare) };
                    let n = n.min(rest.len());
                    body.extend_from_slice(&rest[..n]);
                    n
                }
                None => {
                    let n = chunk.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    n
                }
            };
            rest = &rest[n..];
            while let Some(c) = d.decode_command(&mut buf, &mut args)? {
                assert_eq!(c, Command::Args);
                out.push(std::mem::take(&mut args));
            }
        }
        assert!(!d.in_frame(), "input ended inside a frame");
        Ok(out)
    }

    fn set_command(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = format!("*3\r\n$3\r\nSET\r\n${}\r\n", key.len()).into_bytes();
        v.extend_from_slice(key);
        v.extend_from_slice(format!("\r\n${}\r\n", value.len()).as_bytes());
        v.extend_from_slice(value);
        v.extend_from_slice(b"\r\n");
        v
    }

    #[test]
    fn large_bulk_bodies_arrive_in_their_own_buffer_in_any_split() {
        let big: Vec<u8> = (0..16_384u32).map(|i| (i % 251) as u8).collect();
        let edge = vec![b'e'; DIRECT_BULK_MIN];
        let small = vec![b's'; DIRECT_BULK_MIN - 1];
        let mut input = Vec::new();
        for (k, v) in [
            (&b"a"[..], &big[..]),
            (b"b", &small),
            (b"c", &edge),
            (b"d", &big),
            (b"e", b"x"),
        ] {
            input.extend_from_slice(&set_command(k, v));
        }
        let expected: Vec<Vec<Bytes>> = [(&b"a"[..], &big[..]), (b"b", &small), (b"c", &edge)]
            .into_iter()
            .chain([(&b"d"[..], &big[..]), (b"e", b"x")])
            .map(|(k, v)| {
                vec![
                    Bytes::from_static(b"SET"),
                    Bytes::copy_from_slice(k),
                    Bytes::copy_from_slice(v),
                ]
            })
            .collect();
        for chunk in [1, 2, 7, 100, 4096, 8191, 16_384, 16_400, input.len()] {
            let got = commands_via_reads(&input, chunk, Limits::default(), false).unwrap();
            assert_eq!(got, expected, "reads of {chunk}");
            let got = commands_via_reads(&input, chunk, Limits::default(), true).unwrap();
            assert_eq!(got, expected, "overfilling reads of {chunk}");
            // Straight into `buf` only (an adapter that ignores
            // `direct_body`): the same commands.
            let plain = commands_in_chunks(&input, chunk, Limits::default()).unwrap();
            let plain: Vec<_> = plain.into_iter().map(Result::unwrap).collect();
            assert_eq!(plain, expected, "buffer-only reads of {chunk}");
        }
    }

    /// A large argument left as the only reference to a read buffer the
    /// connection replaced (as `BytesMut::reserve` does when the buffer is
    /// shared) is copied, so storing it cannot pin that buffer.
    #[test]
    fn a_large_argument_alone_in_an_abandoned_read_buffer_is_copied() {
        let value = vec![b'v'; DIRECT_BULK_MIN + 100];
        let mut d = Decoder::new(Limits::default());
        let mut args = Vec::new();
        let mut buf = BytesMut::from(&b"*4\r\n$4\r\nMSET\r\n$1\r\nk\r\n"[..]);
        assert_eq!(d.decode_command(&mut buf, &mut args).unwrap(), None);
        // The value arrives whole in a second buffer, then that buffer is
        // replaced before the last argument comes.
        buf = BytesMut::new();
        buf.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
        buf.extend_from_slice(&value);
        buf.extend_from_slice(b"\r\n$1\r\n");
        let second = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
        assert_eq!(d.decode_command(&mut buf, &mut args).unwrap(), None);
        assert_eq!(d.direct_capacity(), 0, "the value was not a direct body");
        buf = BytesMut::from(&b"w\r\n"[..]);
        assert_eq!(
            d.decode_command(&mut buf, &mut args).unwrap(),
            Some(Command::Args)
        );
        assert_eq!(&args[2][..], &value[..]);
        assert!(
            !second.contains(&(args[2].as_ptr() as usize)),
            "the value still lives in the replaced buffer"
        );
        // A direct body is kept where it was received.
        let input = set_command(b"k", &value);
        let got = commands_via_reads(&input, 100, Limits::default(), false).unwrap();
        assert_eq!(&got[0][2][..], &value[..]);
    }

    #[test]
    fn unpin_gives_a_partial_frame_its_own_bytes_once_and_keeps_direct_bodies() {
        let value = vec![b'v'; DIRECT_BULK_MIN + 10];
        let mut d = Decoder::new(Limits::default());
        let mut args = Vec::new();
        let mut input = b"*4\r\n$4\r\nMSET\r\n$1\r\nk\r\n".to_vec();
        input.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
        let mut buf = BytesMut::from(&input[..]);
        assert_eq!(d.decode_command(&mut buf, &mut args).unwrap(), None);
        // The value's body arrives directly; the frame is still open.
        d.direct_body().unwrap().extend_from_slice(&value);
        d.direct_body().unwrap().extend_from_slice(b"\r\n");
        assert_eq!(d.decode_command(&mut buf, &mut args).unwrap(), None);
        assert!(d.in_frame());
        assert!(!buf.try_reclaim(input.len()), "shared with MSET and k");
        assert_eq!(d.unpin(), 5, "MSET and k, not the direct body");
        assert!(
            buf.try_reclaim(input.len()),
            "the read buffer is its own again"
        );
        assert_eq!(d.unpin(), 0, "each argument once");
        let items = d.partial_bytes() - 5;
        assert_eq!(items % std::mem::size_of::<Frame>(), 0);
        buf.extend_from_slice(b"$1\r\nw\r\n");
        assert_eq!(
            d.decode_command(&mut buf, &mut args).unwrap(),
            Some(Command::Args)
        );
        assert_eq!(d.partial_bytes(), 0);
        assert_eq!(&args[0][..], b"MSET");
        assert_eq!(&args[1][..], b"k");
        assert_eq!(&args[2][..], &value[..]);
        assert_eq!(&args[3][..], b"w");
        assert!(args[2].is_unique(), "the direct body is kept, not copied");
    }

    #[test]
    fn a_header_alone_allocates_at_most_the_preallocation() {
        let value: Vec<u8> = (0..3 * DIRECT_PREALLOC_MAX + 17)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let input = set_command(b"big", &value);
        let header_end = input.len() - value.len() - 2;
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&input[..header_end]);
        let mut args = Vec::new();
        assert_eq!(d.decode_command(&mut buf, &mut args).unwrap(), None);
        assert_eq!(d.direct_capacity(), DIRECT_PREALLOC_MAX);
        // It grows by doubling, exactly (announced before it is made), and
        // never past what is missing, so no read can take the next frame's
        // bytes and the value owns no more than itself.
        let mut sizes = Vec::new();
        loop {
            let announced = d.direct_capacity_for_read();
            let Some(body) = d.direct_body() else { break };
            assert_eq!(body.capacity(), announced);
            sizes.push(body.capacity());
            let missing = value.len() + 2 - body.len();
            assert!(body.capacity() - body.len() <= missing);
            let spare = body.capacity() - body.len();
            let at = input.len() - missing;
            body.extend_from_slice(&input[at..at + spare]);
            let done = d.decode_command(&mut buf, &mut args).unwrap();
            if done.is_some() {
                break;
            }
        }
        assert_eq!(
            sizes,
            [
                DIRECT_PREALLOC_MAX,
                2 * DIRECT_PREALLOC_MAX,
                3 * DIRECT_PREALLOC_MAX + 19
            ]
        );
        assert_eq!(&args[2][..], &value[..]);
        assert_eq!(args[2].len(), value.len());
        // The body still arrives whole, in reads of any size.
        for chunk in [1000, 65_536, DIRECT_PREALLOC_MAX + 1, input.len()] {
            let got = commands_via_reads(&input, chunk, Limits::default(), false).unwrap();
            assert_eq!(got.len(), 1, "reads of {chunk}");
            assert_eq!(&got[0][2][..], &value[..], "reads of {chunk}");
        }
    }

    #[test]
    fn a_direct_body_is_exactly_sized_and_the_only_reference() {
        let value = vec![7u8; 20_000];
        let input = set_command(b"k", &value);
        let header_end = input.len() - value.len() - 2;
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&input[..header_end + 10]);
        let mut args = Vec::new();
        assert_eq!(d.decode_command(&mut buf, &mut args), Ok(None));
        assert!(buf.is_empty(), "the buffered part moved to the body");
        assert_eq!(d.direct_capacity(), value.len() + 2);
        let body = d.direct_body().unwrap();
        assert_eq!(body.len(), 10);
        body.extend_from_slice(&input[header_end + 10..]);
        assert_eq!(
            d.decode_command(&mut buf, &mut args),
            Ok(Some(Command::Args))
        );
        assert_eq!(d.direct_capacity(), 0);
        assert!(d.direct_body().is_none());
        assert_eq!(args[2], value);
        assert!(args[2].is_unique(), "the value owns its buffer");
        assert!(
            !args[1].is_unique(),
            "small arguments share the read buffer"
        );
    }

    #[test]
    fn malformed_large_bulks_are_refused_before_or_after_their_body() {
        // A body not followed by CRLF, direct or not.
        for chunk in [1, 3000, 9000] {
            let mut input = b"*2\r\n$3\r\nGET\r\n$9000\r\n".to_vec();
            input.extend_from_slice(&[b'x'; 9000]);
            input.extend_from_slice(b"XY*1\r\n$4\r\nPING\r\n");
            assert_eq!(
                commands_via_reads(&input, chunk, Limits::default(), false),
                Err(ProtocolError::MissingCrlf),
                "reads of {chunk}"
            );
        }
        // Over the bulk or frame limit, or negative: refused at the header,
        // with nothing allocated for the body.
        let limits = Limits {
            max_bulk_len: 12_000,
            max_frame_bytes: 20_000,
            ..Limits::default()
        };
        for (header, err) in [
            (
                &b"*2\r\n$3\r\nGET\r\n$12001\r\n"[..],
                ProtocolError::BulkTooLong {
                    len: 12_001,
                    max: 12_000,
                },
            ),
            (
                b"*3\r\n$10000\r\n",
                ProtocolError::FrameTooLarge { max: 20_000 },
            ),
            (
                b"*2\r\n$3\r\nGET\r\n$-9000\r\n",
                ProtocolError::NegativeLength {
                    kind: "bulk",
                    len: -9000,
                },
            ),
        ] {
            let mut d = Decoder::new(limits);
            let mut buf = BytesMut::new();
            let mut args = Vec::new();
            let mut input = header.to_vec();
            if header.starts_with(b"*3") {
                // The first 10,000-byte body fits; the second's header does not.
                input.extend_from_slice(&[b'v'; 10_000]);
                input.extend_from_slice(b"\r\n$10000\r\n");
            }
            let mut result = Ok(None);
            for piece in input.chunks(5) {
                match d.direct_body() {
                    Some(body) => body.extend_from_slice(piece),
                    None => buf.extend_from_slice(piece),
                }
                result = d.decode_command(&mut buf, &mut args);
                if result.is_err() {
                    break;
                }
            }
            assert_eq!(result, Err(err));
            assert_eq!(d.direct_capacity(), 0, "no body buffer after {header:?}");
        }
    }

    /// Inline commands split as redis splits them (`sdssplitargs`).
    #[test]
    fn inline_commands_take_quotes_and_escapes() {
        let words = |line: &str| -> Result<Vec<String>, ProtocolError> {
            let mut d = Decoder::new(Limits::default());
            let mut buf = BytesMut::from(line);
            match d.decode(&mut buf)? {
                Some(Frame::Array(items)) => Ok(items
                    .into_iter()
                    .map(|f| match f {
                        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
                        other => panic!("{other:?}"),
                    })
                    .collect()),
                other => panic!("{line:?}: {other:?}"),
            }
        };
        assert_eq!(words("SET k v\r\n").unwrap(), ["SET", "k", "v"]);
        assert_eq!(words("SET k \"v\"\r\n").unwrap(), ["SET", "k", "v"]);
        assert_eq!(
            words("SET k \"hello world\"\r\n").unwrap(),
            ["SET", "k", "hello world"]
        );
        assert_eq!(
            words("SET 'it''s' '\\'q\\''\n").unwrap_err(),
            ProtocolError::UnbalancedQuotes
        );
        assert_eq!(
            words("SET k 'a \\'q\\' b'\n").unwrap(),
            ["SET", "k", "a 'q' b"]
        );
        assert_eq!(
            words("SET k \"\\x41\\n\\t\\\"\\q\\xZZ\"\r\n").unwrap(),
            ["SET", "k", "A\n\t\"qxZZ"]
        );
        assert_eq!(words("SET a\"b c\" d\n").unwrap(), ["SET", "ab c", "d"]);
        assert_eq!(words("ECHO \"\"\n").unwrap(), ["ECHO", ""]);
        // A NUL ends the line (this once looped forever, pushing empty
        // words); vertical tab and form feed separate words but do not
        // end one.
        assert_eq!(words("SET \"k\" v\0\r\n").unwrap(), ["SET", "k", "v"]);
        assert_eq!(words("SET k v\0 w x\r\n").unwrap(), ["SET", "k", "v"]);
        assert_eq!(
            words("SET \"k\0\" v\r\n").unwrap_err(),
            ProtocolError::UnbalancedQuotes
        );
        assert_eq!(words("\x0bSET a\x0bb c\n").unwrap(), ["SET", "a\x0bb", "c"]);
        for bad in [
            "SET k \"abc\r\n",
            "SET k \"a\"b\n",
            "SET k 'abc\n",
            "SET k \"a\\\n",
        ] {
            assert_eq!(
                words(bad).unwrap_err(),
                ProtocolError::UnbalancedQuotes,
                "{bad:?}"
            );
        }
    }

    /// Any line of the bytes that matter to the splitter is split in one
    /// pass: the words never hold more bytes than the line.
    #[test]
    fn quoted_splitting_ends_on_any_line() {
        let alphabet = b"ab \t\r\n\x0b\x0c\0\"'\\x4";
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 24) as usize;
            let line: Vec<u8> = (0..len)
                .map(|i| alphabet[(usize::from(x.to_le_bytes()[i % 8]) + i) % alphabet.len()])
                .collect();
            if let Ok(words) = split_quoted(&line) {
                let held: usize = words.iter().map(Vec::len).sum();
                assert!(
                    held + words.len() <= line.len() + 1,
                    "{line:?} -> {words:?}"
                );
            }
        }
    }

    /// Random input made of the bytes that matter to the decoder, fed in
    /// random pieces: commands or errors, never a panic, and never more
    /// held than the limits allow. (A frame starting with its line end
    /// once panicked it.)
    #[test]
    fn random_input_decodes_or_fails_cleanly() {
        // Pieces of frames, so that random sequences are often near-valid.
        let tokens: &[&[u8]] = &[
            b"*1\r\n",
            b"*2\r\n",
            b"*0\r\n",
            b"*-1\r\n",
            b"*9\r\n",
            b"*100000\r\n",
            b"$1\r\n",
            b"$3\r\n",
            b"$0\r\n",
            b"$-1\r\n",
            b"$-7\r\n",
            b"$99999999999\r\n",
            b"$70\r\n",
            b":5\r\n",
            b"+OK\r\n",
            b"-E\r\n",
            b"%1\r\n",
            b"_\r\n",
            b"\r\n",
            b"\r",
            b"\n",
            b"a",
            b"PING",
            b"GET k\r\n",
            b"\"",
            b"'",
            b" ",
            b"\0",
            b"\\",
            b"1",
            b"-",
            b"*",
            b"$",
        ];
        let limits = Limits {
            max_bulk_len: 64,
            max_elements: 8,
            max_frame_bytes: 512,
            max_depth: 4,
            ..Limits::default()
        };
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..30_000 {
            let count = usize::from(next().to_le_bytes()[0] % 12);
            let input: Vec<u8> = (0..count)
                .flat_map(|_| tokens[usize::from(next().to_le_bytes()[1]) % tokens.len()].iter())
                .copied()
                .collect();
            let split = 1 + usize::from(next().to_le_bytes()[2] % 8);
            let mut d = Decoder::new(limits);
            let mut buf = BytesMut::new();
            let mut args = Vec::new();
            'feed: for piece in input.chunks(split) {
                buf.extend_from_slice(piece);
                loop {
                    match d.decode_command(&mut buf, &mut args) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                assert!(
                    d.partial_bytes() <= 64 * limits.max_frame_bytes,
                    "{input:?}"
                );
            }
        }
    }

    /// An element that starts with its line end has no type byte: an
    /// error, not a slice out of range (it panicked the connection).
    #[test]
    fn an_element_without_a_type_byte_is_an_error() {
        for input in [&b"*1\r\n\r\n"[..], b"*2\r\n$1\r\na\r\n\r\n", b"*1\r\n\r"] {
            for split in [1, input.len()] {
                let mut d = Decoder::new(Limits::default());
                let mut buf = BytesMut::new();
                let mut args = Vec::new();
                let mut result = Ok(None);
                for piece in input.chunks(split) {
                    buf.extend_from_slice(piece);
                    result = d.decode_command(&mut buf, &mut args);
                    if result.is_err() {
                        break;
                    }
                }
                assert_eq!(
                    result,
                    Err(ProtocolError::UnexpectedByte(b'\r')),
                    "{input:?}"
                );
            }
        }
    }

    /// `*0` and `*-1` are no command: skipped without a reply, in one
    /// piece or split; `$-1` is still a frame (an error reply follows).
    #[test]
    fn empty_and_null_arrays_are_skipped_as_requests() {
        let input = b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n*0\r\n$-1\r\n";
        for split in [input.len(), 1, 3] {
            let mut d = Decoder::new(Limits::default());
            let mut buf = BytesMut::new();
            let mut args = Vec::new();
            let mut got = Vec::new();
            for piece in input.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(c) = d.decode_command(&mut buf, &mut args).unwrap() {
                    got.push(match c {
                        Command::Args => format!("{args:?}"),
                        Command::Other(f) => format!("{f:?}"),
                    });
                }
            }
            assert_eq!(got, [r#"[b"PING"]"#, "Null"], "pieces of {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn encodes_resp2_and_resp3() {
        let reply = Reply::Array(vec![
            Reply::ok(),
            Reply::err("bad\r\nthing"),
            Reply::Integer(5),
            Reply::text("hi"),
            Reply::Null,
            Reply::Map(vec![(Reply::text("proto"), Reply::Integer(3))]),
            Reply::Verbatim(Bytes::from_static(b"# Stats\r\nhits:1\r\n")),
        ]);
        let mut out = BytesMut::new();
        encode(&reply, Protocol::Resp2, &mut out);
        assert_eq!(
            &out[..],
            b"*7\r\n+OK\r\n-ERR bad  thing\r\n:5\r\n$2\r\nhi\r\n$-1\r\n*2\r\n$5\r\nproto\r\n:3\r\n\
              $17\r\n# Stats\r\nhits:1\r\n\r\n"
        );
        let mut out = BytesMut::new();
        encode(&reply, Protocol::Resp3, &mut out);
        // A verbatim string's length counts its `txt:` format prefix.
        assert_eq!(
            &out[..],
            b"*7\r\n+OK\r\n-ERR bad  thing\r\n:5\r\n$2\r\nhi\r\n_\r\n%1\r\n$5\r\nproto\r\n:3\r\n\
              =21\r\ntxt:# Stats\r\nhits:1\r\n\r\n"
        );
        // What we encode (RESP2) we decode back.
        let mut buf = BytesMut::new();
        encode(
            &Reply::Array(vec![Reply::text("a"), Reply::Integer(1)]),
            Protocol::Resp2,
            &mut buf,
        );
        assert_eq!(
            Decoder::new(Limits::default()).decode(&mut buf).unwrap(),
            Some(Frame::Array(vec![bulk("a"), Frame::Integer(1)]))
        );
    }

    /// A reply with values on both sides of [`SHARED_BULK_MIN`], next to
    /// each other and between small pieces.
    fn mixed_reply(big: &Bytes, big2: &Bytes, small: &Bytes) -> Reply {
        Reply::Array(vec![
            Reply::text("first"),
            Reply::Bulk(big.clone()),
            Reply::Bulk(big2.clone()),
            Reply::Integer(-7),
            Reply::Bulk(small.clone()),
            Reply::Map(vec![(Reply::text("k"), Reply::Bulk(big.clone()))]),
            Reply::Null,
        ])
    }

    fn values() -> (Bytes, Bytes, Bytes) {
        let big = Bytes::from(
            (0..=250u8)
                .cycle()
                .take(SHARED_BULK_MIN)
                .collect::<Vec<_>>(),
        );
        let big2 = Bytes::from(vec![b'z'; 3 * SHARED_BULK_MIN + 5]);
        let small = Bytes::from(vec![b's'; SHARED_BULK_MIN - 1]);
        (big, big2, small)
    }

    fn gather(out: &Output) -> Vec<u8> {
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = out.chunks_vectored(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn output_keeps_large_values_by_reference_and_encodes_the_same_bytes() {
        let (big, big2, small) = values();
        let reply = mixed_reply(&big, &big2, &small);
        for proto in [Protocol::Resp2, Protocol::Resp3] {
            let mut plain = BytesMut::new();
            encode(&reply, proto, &mut plain);
            let mut out = Output::default();
            encode(&reply, proto, &mut out);
            assert_eq!(out.len(), plain.len());
            assert_eq!(out.remaining(), plain.len());
            assert_eq!(gather(&out), &plain[..]);
            // The large values are the caller's bytes, the small one a copy.
            let mut slices = [std::io::IoSlice::new(&[]); 64];
            let n = out.chunks_vectored(&mut slices);
            let starts: Vec<*const u8> = slices[..n].iter().map(|s| s.as_ptr()).collect();
            assert_eq!(starts.iter().filter(|p| **p == big.as_ptr()).count(), 2);
            assert!(starts.contains(&big2.as_ptr()));
            assert!(!starts.contains(&small.as_ptr()));
            let all = out.copy_to_bytes(plain.len());
            assert_eq!(&all[..], &plain[..]);
            assert!(out.is_empty());
        }
    }

    #[test]
    fn output_writes_out_in_any_pieces_and_is_reusable() {
        let (big, big2, small) = values();
        let reply = mixed_reply(&big, &big2, &small);
        let mut plain = BytesMut::new();
        encode(&reply, Protocol::Resp2, &mut plain);
        let mut out = Output::with_capacity(16);
        // Short writes of every kind: a byte, across a part's end, exactly
        // a part, a few parts at once, all of it.
        for step in [1, 7, SHARED_BULK_MIN - 1, SHARED_BULK_MIN, 5_000, 1 << 20] {
            out.clear();
            encode(&reply, Protocol::Resp2, &mut out);
            let mut written = Vec::new();
            while out.has_remaining() {
                // What a vectored write of at most `step` bytes over the
                // first three parts takes.
                let mut slices = [std::io::IoSlice::new(&[]); 3];
                let n = out.chunks_vectored(&mut slices);
                assert!(n > 0 && slices[..n].iter().all(|s| !s.is_empty()));
                let mut took = 0;
                for s in &slices[..n] {
                    let k = s.len().min(step - took);
                    written.extend_from_slice(&s[..k]);
                    took += k;
                    if took == step {
                        break;
                    }
                }
                assert_eq!(out.chunk(), &slices[0][..]);
                out.advance(took);
                assert_eq!(out.len() + written.len(), plain.len());
            }
            assert_eq!(written, &plain[..], "step {step}");
        }
        // Small replies only: one part, the copy buffer.
        out.clear();
        encode(&Reply::ok(), Protocol::Resp2, &mut out);
        encode(&Reply::text("x"), Protocol::Resp2, &mut out);
        assert_eq!(gather(&out), b"+OK\r\n$1\r\nx\r\n");
        assert_eq!(out.chunk(), b"+OK\r\n$1\r\nx\r\n");
    }

    #[test]
    fn output_remembers_how_large_its_copy_buffer_grew() {
        // Many small values (copied): the buffer grows past 256 KiB, and
        // writing it out and clearing it does not hide that.
        let reply = Reply::Array(
            (0..3000)
                .map(|_| Reply::Bulk(Bytes::from(vec![b'v'; 100])))
                .collect(),
        );
        let mut out = Output::with_capacity(16);
        encode(&reply, Protocol::Resp2, &mut out);
        let held = out.len();
        assert!(held > 256 << 10);
        assert_eq!(out.peak(), held);
        out.advance(held);
        out.clear();
        assert_eq!(out.peak(), held);
        // Shared values are not in the copy buffer.
        let mut out = Output::default();
        encode(
            &Reply::Bulk(Bytes::from(vec![b'z'; 1 << 20])),
            Protocol::Resp2,
            &mut out,
        );
        assert!(out.peak() < 16, "{}", out.peak());
    }
}
