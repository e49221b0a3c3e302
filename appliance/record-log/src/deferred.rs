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
    done: u64,
    /// The first failure; no ticket after it writes.
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
            spent: false,
        }
    }

    /// The first failed (or abandoned) write, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.state().failure.clone()
    }

    /// Whether every ticket issued so far has been written (or failed).
    pub(crate) fn is_idle(&self) -> bool {
        let st = self.state();
        st.done >= st.issued || st.failure.is_some()
    }

    /// Waits until the bytes of every ticket issued so far are written, or
    /// one of them failed.
    pub(crate) fn wait_idle(&self) -> Result<(), String> {
        let mut st = self.state();
        while st.done < st.issued && st.failure.is_none() {
            st = self.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.failure.clone().map_or(Ok(()), Err)
    }

    fn fail(&self, st: &mut QueueState, reason: String) {
        st.failure.get_or_insert(reason);
        self.failed.store(true, Ordering::Release);
    }
}

/// The right to write one batch of bytes, after every earlier ticket's.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<WriteQueue>,
    n: u64,
    spent: bool,
}

impl Ticket {
    /// Waits for the writes of every earlier ticket, then runs `write`
    /// while holding the turn (nothing else writes meanwhile). If an earlier
    /// write failed, `write` does not run and that failure is returned.
    pub(crate) fn write_in_turn<E: std::fmt::Display>(
        mut self,
        write: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), WriteFailed<E>> {
        self.spent = true;
        let q = &self.queue;
        let mut st = q.state();
        while st.done + 1 < self.n && st.failure.is_none() {
            st = q.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        let result = match &st.failure {
            Some(f) => Err(WriteFailed::Earlier(f.clone())),
            None => write().map_err(WriteFailed::This),
        };
        match &result {
            Ok(()) => st.done = self.n,
            Err(WriteFailed::This(e)) => q.fail(&mut st, e.to_string()),
            Err(WriteFailed::Earlier(_)) => {}
        }
        drop(st);
        q.turn.notify_all();
        result
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.spent {
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
        for (i, t) in tickets.into_iter().enumerate().rev() {
            let order = order.clone();
            threads.push(std::thread::spawn(move || {
                t.write_in_turn(|| {
                    order.lock().unwrap().push(i);
                    Ok::<(), String>(())
                })
                .unwrap();
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
        let (a, b, c) = (q.issue(), q.issue(), q.issue());
        a.write_in_turn(|| Ok::<(), String>(())).unwrap();
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
    }

    #[test]
    fn an_abandoned_ticket_fails_the_later_ones_instead_of_hanging() {
        let q = Arc::new(WriteQueue::default());
        let (a, b) = (q.issue(), q.issue());
        drop(a);
        let r = b.write_in_turn(|| Ok::<(), String>(()));
        assert!(matches!(r, Err(WriteFailed::Earlier(ref f)) if f.contains("dropped")));
        assert!(q.wait_idle().is_err());
    }
}
