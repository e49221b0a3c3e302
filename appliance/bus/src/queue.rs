//! Bounded queues between the publisher's fan-out and each consumer. A push
//! never blocks and never waits: over the bound, the slow-consumer policy
//! decides, or (for durable messages to an in-process subscriber) the
//! subscriber is switched to catching up from the log. A drop-oldest
//! in-process queue can hand what it evicts to an [`Evict`] sink (a
//! handler's subscription dead-letters it) instead of dropping it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::message::Message;
use crate::proto;

/// What to do with a subscriber whose queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumerPolicy {
    /// Close it (NATS: `-ERR 'Slow Consumer'` and disconnect).
    #[default]
    Disconnect,
    /// Drop its oldest queued message and count the drop.
    DropOldest,
}

/// Why a subscription or connection stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// It fell behind under [`SlowConsumerPolicy::Disconnect`].
    SlowConsumer,
    /// It was unsubscribed (or reached its maximum number of messages).
    Unsubscribed,
    /// The bus shut down.
    BusClosed,
    /// The connection closed.
    ConnectionClosed,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SlowConsumer => "slow consumer",
            Self::Unsubscribed => "unsubscribed",
            Self::BusClosed => "bus closed",
            Self::ConnectionClosed => "connection closed",
        })
    }
}

/// Result of offering one message to a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued.
    Queued,
    /// Queued after dropping an older message.
    QueuedDroppedOldest,
    /// Not queued: the queue refused the message itself. Nothing is counted
    /// or evicted yet: a queue group offers it to the next member, and if
    /// nobody takes it the fan-out drops it once, through a refusing
    /// member's [`Evict`] sink if one takes it.
    Dropped,
    /// Not queued; the subscriber will read it from the durable log.
    Deferred,
    /// The consumer was just closed as a slow consumer.
    SlowConsumer,
    /// The consumer was already closed.
    Closed,
}

#[derive(Debug)]
pub(crate) struct LocalState {
    pub buf: VecDeque<Message>,
    pub closed: Option<CloseReason>,
    /// While catching up from the log: the highest durable sequence number
    /// that was not queued.
    pub lag_high: Option<u64>,
    /// A queue group member's deferred sequence numbers, oldest first: it
    /// catches up with these only, not with every matching record (the
    /// others went to other members). `None` for other subscriptions.
    pub deferred: Option<VecDeque<u64>>,
    /// Durable messages deferred to the log and not yet read back: what is
    /// lost if catching up fails, or skips them (removed by retention).
    pub lagged: u64,
    /// Catching up has read every record below this: a message deferred
    /// below it was read back already (its fan-out came late) and is not
    /// counted in `lagged`.
    pub read_upto: u64,
    /// The first durable sequence number offered to the queue (the log's
    /// next one when it subscribed); older ones it reads as history
    /// (`from_seq`), not counted in `lagged`.
    pub offered_from: u64,
}

/// Takes the messages a drop-oldest [`LocalQueue`] evicts (non-durable
/// ones: durable messages are never evicted), instead of dropping them.
/// Called from the publisher's fan-out, possibly under the durable log's
/// lock and never under the queue's own: it must not block and must not
/// publish (publishing takes that lock and can come back to this queue).
/// It gives the message back (`Err`) when it does not take it (a handler
/// whose handle is dropped): then it is counted dropped.
pub(crate) struct Evict(pub Box<dyn Fn(Message) -> Result<(), Message> + Send + Sync>);

impl std::fmt::Debug for Evict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Evict")
    }
}

/// Told, when it happens, how many durable messages deferred to a
/// subscription it could not read back from the log (a read error, or
/// removed by retention first): a handler counts them lost at once, not
/// when its next message comes. Called from the subscriber's `recv`, under
/// the queue's lock: it must not block or touch the queue.
pub(crate) struct Lost(pub Box<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lost")
    }
}

/// Most sequence numbers one queue group member keeps deferred (8 MiB of
/// them): past this a message is offered to the next member instead.
pub(crate) const MAX_DEFERRED: usize = 1 << 20;

/// The queue of one in-process subscription.
#[derive(Debug)]
pub(crate) struct LocalQueue {
    pub state: Mutex<LocalState>,
    pub notify: Notify,
    cap: usize,
    policy: SlowConsumerPolicy,
    /// Durable messages are deferred to the log instead of being dropped.
    catch_up: bool,
    /// Where evicted messages go instead of being dropped.
    evict: Option<Evict>,
    /// Told of deferred durable messages not read back.
    pub lost: Option<Lost>,
    /// Messages dropped (not handed to `evict`).
    pub dropped: AtomicU64,
    /// Dead letters and retry outcomes are neither offered to it nor read
    /// back from the log for it (a handler that does not name them).
    pub skip_dead_letters: bool,
}

impl LocalQueue {
    /// `group`: a queue group member, which catches up with exactly what
    /// was deferred to it (see [`LocalState::deferred`]).
    pub fn new(
        cap: usize,
        policy: SlowConsumerPolicy,
        catch_up: bool,
        lag_high: Option<u64>,
        group: bool,
    ) -> Self {
        Self {
            state: Mutex::new(LocalState {
                buf: VecDeque::with_capacity(cap.min(1024)),
                closed: None,
                lag_high,
                deferred: group.then(VecDeque::new),
                lagged: 0,
                read_upto: 0,
                offered_from: 0,
            }),
            notify: Notify::new(),
            cap: cap.max(1),
            policy,
            catch_up,
            evict: None,
            lost: None,
            dropped: AtomicU64::new(0),
            skip_dead_letters: false,
        }
    }

    /// Hands what drop-oldest evicts to `evict` instead of dropping it
    /// (the offer still reports the eviction, for the subject's counters).
    pub fn with_evict(mut self, evict: Evict) -> Self {
        self.evict = Some(evict);
        self
    }

    pub fn offer(&self, msg: &Message) -> Offer {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return Offer::Closed;
        }
        let durable_seq = msg.seq.filter(|_| self.catch_up);
        if let Some(seq) = durable_seq {
            if st.lag_high.is_some() || st.buf.len() >= self.cap {
                if let Some(d) = st.deferred.as_mut() {
                    if d.len() >= MAX_DEFERRED {
                        // Not deferred: the group offers it to another
                        // member (see `Offer::Dropped`).
                        return Offer::Dropped;
                    }
                    d.push_back(seq);
                }
                if seq >= st.read_upto {
                    st.lagged += 1;
                }
                st.lag_high = Some(seq);
                drop(st);
                self.notify.notify_one();
                return Offer::Deferred;
            }
        }
        if st.buf.len() >= self.cap {
            match self.policy {
                SlowConsumerPolicy::Disconnect => {
                    st.closed = Some(CloseReason::SlowConsumer);
                    st.buf.clear();
                    drop(st);
                    self.notify.notify_one();
                    return Offer::SlowConsumer;
                }
                SlowConsumerPolicy::DropOldest => {
                    // Durable messages in the queue are never dropped: they
                    // cannot be re-read once the subscriber has moved past.
                    let victim = if self.catch_up {
                        st.buf.iter().position(|m| m.seq.is_none())
                    } else {
                        Some(0)
                    };
                    // Full of durable messages: this one is refused (see
                    // `Offer::Dropped`).
                    let Some(i) = victim else {
                        return Offer::Dropped;
                    };
                    let evicted = st.buf.remove(i);
                    st.buf.push_back(msg.clone());
                    drop(st);
                    self.notify.notify_one();
                    if let Some(m) = evicted {
                        self.drop_refused(m);
                    }
                    return Offer::QueuedDroppedOldest;
                }
            }
        }
        st.buf.push_back(msg.clone());
        drop(st);
        self.notify.notify_one();
        Offer::Queued
    }

    /// A message this queue evicted, or refused with [`Offer::Dropped`]
    /// and nobody else took: handed to the [`Evict`] sink if there is one
    /// and it takes it, else counted dropped. Call without the queue's lock.
    pub fn drop_refused(&self, msg: Message) {
        if self.evict(msg).is_err() {
            self.count_dropped();
        }
    }

    /// Whether this queue hands what it evicts to an [`Evict`] sink.
    pub fn evicts(&self) -> bool {
        self.evict.is_some()
    }

    /// Hands `msg` to the [`Evict`] sink; gives it back if there is none
    /// or the sink does not take it. Call without the queue's lock.
    pub fn evict(&self, msg: Message) -> Result<(), Message> {
        match &self.evict {
            Some(evict) => (evict.0)(msg),
            None => Err(msg),
        }
    }

    /// Counts one message dropped for this subscriber.
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn close(&self, reason: CloseReason) {
        self.state.lock().closed.get_or_insert(reason);
        self.notify.notify_one();
    }
}

/// Largest drained outbound buffer kept for reuse.
const KEEP_BUFFER: usize = 1 << 20;

#[derive(Debug)]
struct OutState {
    buf: BytesMut,
    /// Frames in `buf`, oldest first: (length, droppable).
    frames: VecDeque<(usize, bool)>,
    closed: Option<CloseReason>,
}

/// The outbound queue of one NATS connection: encoded frames, bounded in
/// bytes and in messages. The connection's writer task drains it.
#[derive(Debug)]
pub(crate) struct ConnOutbound {
    state: Mutex<OutState>,
    pub notify: Notify,
    max_bytes: usize,
    max_msgs: usize,
    policy: SlowConsumerPolicy,
    pub dropped: AtomicU64,
}

impl ConnOutbound {
    pub fn new(max_bytes: usize, max_msgs: usize, policy: SlowConsumerPolicy) -> Self {
        Self {
            state: Mutex::new(OutState {
                buf: BytesMut::with_capacity(16 * 1024),
                frames: VecDeque::new(),
                closed: None,
            }),
            notify: Notify::new(),
            max_bytes,
            max_msgs,
            policy,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a message frame for `sid`. Also says whether the queue was
    /// empty before: then the caller must wake the writer (`notify`), which
    /// it may do once after a whole run of messages. (The writer drains
    /// everything it finds, so later messages ride on that wake.)
    pub fn offer_msg(&self, msg: &Message, sid: &str, with_headers: bool) -> (Offer, bool) {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return (Offer::Closed, false);
        }
        let start = st.buf.len();
        let was_empty = start == 0;
        let reply = msg.reply.as_ref().map(|r| r.as_str());
        match (&msg.headers, with_headers) {
            (Some(h), true) => proto::encode_hmsg(
                &mut st.buf,
                msg.subject.as_str(),
                sid,
                reply,
                h,
                &msg.payload,
            ),
            _ => proto::encode_msg(&mut st.buf, msg.subject.as_str(), sid, reply, &msg.payload),
        }
        let len = st.buf.len() - start;
        st.frames.push_back((len, true));
        (self.enforce(&mut st), was_empty)
    }

    /// Queues a control frame (PONG, +OK, -ERR, INFO): never dropped, but
    /// counted against the byte bound.
    pub fn push_control(&self, bytes: &[u8]) -> Offer {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return Offer::Closed;
        }
        st.buf.extend_from_slice(bytes);
        st.frames.push_back((bytes.len(), false));
        let offer = self.enforce(&mut st);
        drop(st);
        self.notify.notify_one();
        offer
    }

    fn enforce(&self, st: &mut OutState) -> Offer {
        let mut offer = Offer::Queued;
        while st.buf.len() > self.max_bytes || st.frames.len() > self.max_msgs {
            let victim = match self.policy {
                SlowConsumerPolicy::DropOldest => st.frames.iter().position(|(_, d)| *d),
                SlowConsumerPolicy::Disconnect => None,
            };
            let Some(i) = victim else {
                st.closed = Some(CloseReason::SlowConsumer);
                st.buf.clear();
                st.frames.clear();
                self.notify.notify_one();
                return Offer::SlowConsumer;
            };
            let off: usize = st.frames.iter().take(i).map(|(l, _)| l).sum();
            let (len, _) = st.frames.remove(i).unwrap_or((0, true));
            if off == 0 {
                st.buf.advance(len);
            } else {
                let mut tail = st.buf.split_off(off);
                tail.advance(len);
                st.buf.unsplit(tail);
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
            offer = Offer::QueuedDroppedOldest;
        }
        offer
    }

    /// Moves everything queued into `out` (emptied first), by swapping
    /// buffers: the writer's drained buffer becomes the queue's, so a busy
    /// connection reuses two allocations. Returns whether anything was
    /// taken. Once closed, what was queued before the close is still handed
    /// out (a slow consumer's queue is discarded at the close), then
    /// `Err(reason)`.
    pub fn take_into(&self, out: &mut BytesMut) -> Result<bool, CloseReason> {
        out.clear();
        if out.capacity() > KEEP_BUFFER {
            // Don't hold on to a burst's worth of memory.
            *out = BytesMut::new();
        }
        let mut st = self.state.lock();
        if st.buf.is_empty() {
            return match st.closed {
                Some(r) => Err(r),
                None => Ok(false),
            };
        }
        st.frames.clear();
        std::mem::swap(&mut st.buf, out);
        Ok(true)
    }

    pub fn close(&self, reason: CloseReason) {
        let mut st = self.state.lock();
        st.closed.get_or_insert(reason);
        drop(st);
        self.notify.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::Subject;
    use bytes::Bytes;

    fn msg(i: u64, seq: Option<u64>) -> Message {
        Message {
            subject: Subject::new("a.b").unwrap(),
            reply: None,
            headers: None,
            payload: Bytes::from(i.to_string()),
            seq,
            ts_ms: 0,
        }
    }

    fn payloads(q: &LocalQueue) -> Vec<String> {
        q.state
            .lock()
            .buf
            .iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn local_drop_oldest() {
        let q = LocalQueue::new(2, SlowConsumerPolicy::DropOldest, false, None, false);
        assert_eq!(q.offer(&msg(1, None)), Offer::Queued);
        assert_eq!(q.offer(&msg(2, None)), Offer::Queued);
        assert_eq!(q.offer(&msg(3, None)), Offer::QueuedDroppedOldest);
        assert_eq!(payloads(&q), vec!["2", "3"]);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn local_disconnect() {
        let q = LocalQueue::new(1, SlowConsumerPolicy::Disconnect, false, None, false);
        assert_eq!(q.offer(&msg(1, None)), Offer::Queued);
        assert_eq!(q.offer(&msg(2, None)), Offer::SlowConsumer);
        assert_eq!(q.offer(&msg(3, None)), Offer::Closed);
        assert_eq!(q.state.lock().closed, Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn local_durable_defers_instead_of_dropping() {
        let q = LocalQueue::new(2, SlowConsumerPolicy::Disconnect, true, None, false);
        q.offer(&msg(1, Some(1)));
        q.offer(&msg(2, Some(2)));
        assert_eq!(q.offer(&msg(3, Some(3))), Offer::Deferred);
        assert_eq!(q.state.lock().lag_high, Some(3));
        // Once lagging, later durable messages are deferred even with room.
        q.state.lock().buf.clear();
        assert_eq!(q.offer(&msg(4, Some(4))), Offer::Deferred);
        assert_eq!(q.state.lock().lag_high, Some(4));
        assert!(q.state.lock().closed.is_none());
        // Drop-oldest never drops a durable message from the queue.
        let q = LocalQueue::new(2, SlowConsumerPolicy::DropOldest, true, None, false);
        q.offer(&msg(1, Some(1)));
        q.offer(&msg(2, None));
        assert_eq!(q.offer(&msg(3, None)), Offer::QueuedDroppedOldest);
        assert_eq!(payloads(&q), vec!["1", "3"]);
        q.state.lock().buf.pop_back();
        q.offer(&msg(4, Some(2)));
        assert_eq!(q.offer(&msg(5, None)), Offer::Dropped);
    }

    #[test]
    fn local_evict_sink_takes_what_drop_oldest_drops() {
        let got = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let g2 = got.clone();
        let evict = Evict(Box::new(move |m: Message| {
            g2.lock()
                .push(String::from_utf8(m.payload.to_vec()).unwrap());
            Ok(())
        }));
        let q =
            LocalQueue::new(2, SlowConsumerPolicy::DropOldest, true, None, false).with_evict(evict);
        q.offer(&msg(1, Some(1)));
        q.offer(&msg(2, None));
        // The oldest non-durable message goes to the sink, not counted.
        assert_eq!(q.offer(&msg(3, None)), Offer::QueuedDroppedOldest);
        assert_eq!(payloads(&q), vec!["1", "3"]);
        assert_eq!(*got.lock(), vec!["2"]);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
        // Full of durable messages: the new one is refused, untouched, until
        // the caller drops it.
        q.state.lock().buf.pop_back();
        q.offer(&msg(4, Some(2)));
        let refused = msg(5, None);
        assert_eq!(q.offer(&refused), Offer::Dropped);
        assert_eq!(*got.lock(), vec!["2"]);
        q.drop_refused(refused);
        assert_eq!(*got.lock(), vec!["2", "5"]);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
        // A sink that does not take it (a dropped handler) gives it back:
        // counted.
        let q = LocalQueue::new(1, SlowConsumerPolicy::DropOldest, false, None, false)
            .with_evict(Evict(Box::new(Err)));
        q.offer(&msg(1, None));
        assert_eq!(q.offer(&msg(2, None)), Offer::QueuedDroppedOldest);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(
            q.evict(msg(3, None)).map_err(|m| m.payload),
            Err("3".into())
        );
        // Without a sink the same is counted.
        let q = LocalQueue::new(1, SlowConsumerPolicy::DropOldest, true, None, false);
        q.offer(&msg(1, Some(1)));
        let refused = msg(2, None);
        assert_eq!(q.offer(&refused), Offer::Dropped);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
        q.drop_refused(refused);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn conn_bounds() {
        let o = ConnOutbound::new(60, 100, SlowConsumerPolicy::DropOldest);
        o.push_control(b"PONG\r\n");
        for i in 0..5 {
            let _ = o.offer_msg(&msg(i, None), "1", true);
        }
        let mut out = BytesMut::new();
        assert_eq!(o.take_into(&mut out), Ok(true));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with("PONG\r\n"),
            "control frames are kept: {text}"
        );
        assert!(text.len() <= 60);
        assert!(text.ends_with("MSG a.b 1 1\r\n4\r\n"), "{text}");
        assert!(o.dropped.load(Ordering::Relaxed) > 0);
        // Drained: nothing more, and the buffers swap without losing frames.
        assert_eq!(o.take_into(&mut out), Ok(false));
        assert!(out.is_empty());
        o.push_control(b"PING\r\n");
        assert_eq!(o.take_into(&mut out), Ok(true));
        assert_eq!(&out[..], b"PING\r\n");

        let o = ConnOutbound::new(40, 100, SlowConsumerPolicy::Disconnect);
        assert_eq!(o.offer_msg(&msg(1, None), "1", true), (Offer::Queued, true));
        assert_eq!(
            o.offer_msg(&msg(2, None), "1", true),
            (Offer::Queued, false)
        );
        assert_eq!(o.offer_msg(&msg(3, None), "1", true).0, Offer::SlowConsumer);
        assert_eq!(o.take_into(&mut out), Err(CloseReason::SlowConsumer));
    }
}
