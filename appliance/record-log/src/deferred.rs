//! Deferred writes ([`LogOptions::defer_writes`](crate::LogOptions)): the
//! order in which encoded frames reach the files.
//!
//! With deferred writes, `append` only encodes frames into memory. The bytes
//! are written later, by whoever runs the [`PendingSync`](crate::PendingSync)
//! that carries them (usually a syncer thread, without the `Log`), or by the
//! `Log` itself when it must (`sync`, compaction, a memory bound). Those
//! writers can run at the same time, so every batch of bytes handed out gets
//! a [`Ticket`]: tickets are issued in the order the bytes were appended
//! (under `&mut Log`), and a ticket's bytes are written only after those of
//! every earlier ticket. Segments are opened with `O_APPEND`, so writing in
//! ticket order puts each frame at the offset the `Log` accounted for.
//!
//! A failed write fails every later ticket without writing it (its frames
//! would land after a hole), and the `Log` refuses appends from then on; a
//! ticket dropped unused (its `PendingSync` was never run) counts as a
//! failed write. Reopening the log runs recovery, which cuts off whatever
//! partial frame the failure left.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// The shared write order of one `Log`.
#[derive(Debug, Default)]
pub(crate) struct WriteQueue {
    state: Mutex<QueueState>,
    turn: Condvar,
    failed: AtomicBool,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Tickets handed out (the last one's number).
    issued: u64,
    /// Tickets whose bytes are written (all of them up to this number).
    written: u64,
    /// Tickets settled, all of them up to this number: their writes done
    /// and their fsyncs (if any) finished.
    settled: u64,
    /// Tickets settled out of order, waiting for an earlier one.
    settled_early: BTreeSet<u64>,
    /// The first failure; no ticket after it writes or settles.
    failure: Option<String>,
}

impl WriteQueue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next ticket. Called by the `Log` under `&mut self`, in append order.
    pub(crate) fn issue(self: &Arc<Self>) -> Ticket {
        let mut st = self.state();
        st.issued += 1;
        Ticket {
            queue: self.clone(),
            n: st.issued,
            finished: false,
        }
    }

    /// The first failed (or abandoned) write or fsync, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.state().failure.clone()
    }

    /// Whether every ticket issued so far has been written (or one failed).
    pub(crate) fn is_idle(&self) -> bool {
        let st = self.state();
        st.written >= st.issued || st.failure.is_some()
    }

    /// Waits until the bytes of every ticket issued so far are written, or
    /// one of them failed.
    pub(crate) fn wait_idle(&self) -> Result<(), String> {
        let mut st = self.state();
        while st.written < st.issued && st.failure.is_none() {
            st = self.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.failure.clone().map_or(Ok(()), Err)
    }

    fn fail(&self, st: &mut QueueState, reason: String) {
        st.failure.get_or_insert(reason);
        self.failed.store(true, Ordering::Release);
    }
}

/// A place in the write order: its bytes are written only after those of
/// every earlier ticket ([`write_in_turn`](Self::write_in_turn)), and it
/// counts as durable only once every earlier ticket is too
/// ([`settle`](Self::settle)). A ticket must end in `settle` or
/// [`release`](Self::release); dropped otherwise (its writer gave up or
/// its `PendingSync` was never run), it fails the queue, so that nothing
/// after it waits forever or is acknowledged.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<WriteQueue>,
    n: u64,
    finished: bool,
}

impl Ticket {
    /// Waits for the writes of every earlier ticket, then runs `write`
    /// while holding the turn (nothing else writes meanwhile). If an earlier
    /// write failed, `write` does not run and that failure is returned. A
    /// failure of `write` (or a panic in it) fails the queue.
    pub(crate) fn write_in_turn<E: std::fmt::Display>(
        &mut self,
        write: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), WriteFailed<E>> {
        let q = self.queue.clone();
        let mut st = q.state();
        while st.written + 1 < self.n && st.failure.is_none() {
            st = q.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if let Some(f) = &st.failure {
            return Err(WriteFailed::Earlier(f.clone()));
        }
        // The turn is this ticket's until `written` moves on: nobody else
        // writes meanwhile, so the lock is not held across the IO (settling,
        // issuing and readers' waits go on).
        drop(st);
        let outcome = catch_unwind(AssertUnwindSafe(write));
        let mut st = q.state();
        let result = match outcome {
            Ok(r) => r,
            Err(panic) => {
                q.fail(&mut st, "a deferred write panicked".into());
                drop(st);
                q.turn.notify_all();
                resume_unwind(panic);
            }
        };
        match &result {
            Ok(()) => st.written = self.n,
            Err(e) => q.fail(&mut st, e.to_string()),
        }
        drop(st);
        q.turn.notify_all();
        result.map_err(WriteFailed::This)
    }

    /// Records that this ticket's own work (its writes and fsyncs) is done,
    /// then waits until every earlier ticket's is: only then is everything
    /// up to this ticket durable. Returns the queue's failure instead if
    /// there is one.
    pub(crate) fn settle(mut self) -> Result<(), String> {
        self.finished = true;
        let q = self.queue.clone();
        let mut st = q.state();
        Self::mark_settled(&q, &mut st, self.n);
        while st.settled < self.n && st.failure.is_none() {
            st = q.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.failure.clone().map_or(Ok(()), Err)
    }

    /// Records that this ticket owes nothing more (its bytes are written
    /// and it has no fsync of its own to run), without waiting.
    pub(crate) fn release(mut self) {
        self.finished = true;
        let q = self.queue.clone();
        let mut st = q.state();
        Self::mark_settled(&q, &mut st, self.n);
    }

    /// Fails the queue with `reason` (this ticket's fsync failed).
    pub(crate) fn fail(mut self, reason: String) {
        self.finished = true;
        let q = self.queue.clone();
        let mut st = q.state();
        q.fail(&mut st, reason);
        drop(st);
        q.turn.notify_all();
    }

    fn mark_settled(q: &WriteQueue, st: &mut QueueState, n: u64) {
        if n == st.settled + 1 {
            st.settled = n;
            while st.settled_early.remove(&(st.settled + 1)) {
                st.settled += 1;
            }
            q.turn.notify_all();
        } else {
            st.settled_early.insert(n);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            let q = &self.queue;
            let mut st = q.state();
            q.fail(
                &mut st,
                "a deferred write was dropped before it ran (PendingSync not run)".into(),
            );
            drop(st);
            q.turn.notify_all();
        }
    }
}

/// Why [`Ticket::write_in_turn`] did not write.
#[derive(Debug)]
pub(crate) enum WriteFailed<E> {
    /// An earlier ticket's write failed (or was abandoned): the reason.
    Earlier(String),
    /// This ticket's write failed.
    This(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_write_in_issue_order_across_threads() {
        let q = Arc::new(WriteQueue::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..8).map(|_| q.issue()).collect();
        let mut threads = Vec::new();
        // Run them from threads started in reverse order.
        for (i, mut t) in tickets.into_iter().enumerate().rev() {
            let order = order.clone();
            threads.push(std::thread::spawn(move || {
                t.write_in_turn(|| {
                    order.lock().unwrap().push(i);
                    Ok::<(), String>(())
                })
                .unwrap();
                t.settle().unwrap();
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        q.wait_idle().unwrap();
        assert!(q.failure().is_none());
    }

    #[test]
    fn a_failure_stops_every_later_ticket() {
        let q = Arc::new(WriteQueue::default());
        let (mut a, mut b, mut c) = (q.issue(), q.issue(), q.issue());
        a.write_in_turn(|| Ok::<(), String>(())).unwrap();
        a.release();
        assert!(matches!(
            b.write_in_turn(|| Err::<(), _>("disk full".to_string())),
            Err(WriteFailed::This(_))
        ));
        let mut ran = false;
        let r = c.write_in_turn(|| {
            ran = true;
            Ok::<(), String>(())
        });
        assert!(matches!(r, Err(WriteFailed::Earlier(ref f)) if f == "disk full"));
        assert!(!ran);
        assert_eq!(q.failure().as_deref(), Some("disk full"));
        assert_eq!(q.wait_idle(), Err("disk full".to_string()));
        assert_eq!(c.settle(), Err("disk full".to_string()));
        drop(b);
    }

    #[test]
    fn settling_waits_for_every_earlier_ticket() {
        let q = Arc::new(WriteQueue::default());
        let (mut a, mut b, mut c) = (q.issue(), q.issue(), q.issue());
        for t in [&mut a, &mut b, &mut c] {
            t.write_in_turn(|| Ok::<(), String>(())).unwrap();
        }
        // `c` settles first and has no work left (a write-only ticket);
        // `b`'s settle must still wait for `a`, which is slow.
        c.release();
        let settled = Arc::new(AtomicBool::new(false));
        let waiter = {
            let settled = settled.clone();
            std::thread::spawn(move || {
                b.settle().unwrap();
                settled.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!settled.load(Ordering::SeqCst), "b settled before a");
        a.settle().unwrap();
        waiter.join().unwrap();
        assert!(settled.load(Ordering::SeqCst));
        // A later ticket sees everything settled at once.
        let mut d = q.issue();
        d.write_in_turn(|| Ok::<(), String>(())).unwrap();
        d.settle().unwrap();
    }

    #[test]
    fn a_failed_fsync_fails_the_tickets_waiting_to_settle() {
        let q = Arc::new(WriteQueue::default());
        let (mut a, mut b) = (q.issue(), q.issue());
        a.write_in_turn(|| Ok::<(), String>(())).unwrap();
        b.write_in_turn(|| Ok::<(), String>(())).unwrap();
        let waiter = std::thread::spawn(move || b.settle());
        std::thread::sleep(std::time::Duration::from_millis(20));
        a.fail("fdatasync: EIO".into());
        assert_eq!(waiter.join().unwrap(), Err("fdatasync: EIO".to_string()));
    }

    #[test]
    fn a_panicking_write_fails_the_queue_instead_of_blocking_it() {
        let q = Arc::new(WriteQueue::default());
        let (mut a, mut b) = (q.issue(), q.issue());
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _ = a.write_in_turn(|| -> Result<(), String> { panic!("boom") });
        }));
        assert!(r.is_err());
        assert!(matches!(
            b.write_in_turn(|| Ok::<(), String>(())),
            Err(WriteFailed::Earlier(ref f)) if f.contains("panicked")
        ));
        drop((a, b));
    }

    #[test]
    fn an_abandoned_ticket_fails_the_later_ones_instead_of_hanging() {
        let q = Arc::new(WriteQueue::default());
        let (a, mut b) = (q.issue(), q.issue());
        drop(a);
        let r = b.write_in_turn(|| Ok::<(), String>(()));
        assert!(matches!(r, Err(WriteFailed::Earlier(ref f)) if f.contains("dropped")));
        assert!(q.wait_idle().is_err());
    }
}
