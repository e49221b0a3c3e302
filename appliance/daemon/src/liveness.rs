//! Liveness pings answered by a component's own task.
//!
//! The supervisor holds a [`LivenessProbe`] per component; the component's task
//! holds the matching [`LivenessResponder`] and answers from inside its own
//! event loop (`tokio::select!` on [`LivenessResponder::recv`]). An answer
//! therefore proves that the task still runs and is not stuck, which a shared
//! flag or a detached timer would not.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// Creates a connected probe/responder pair for one component.
pub fn pair(name: &str) -> (LivenessProbe, LivenessResponder) {
    // One outstanding ping at a time is enough: the supervisor waits for each.
    let (tx, rx) = mpsc::channel(1);
    (
        LivenessProbe {
            name: name.to_owned(),
            tx,
        },
        LivenessResponder { rx },
    )
}

/// The supervisor's side.
#[derive(Debug, Clone)]
pub struct LivenessProbe {
    name: String,
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

impl LivenessProbe {
    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the component to answer within `timeout`.
    pub async fn check(&self, timeout: Duration) -> Result<(), String> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let ask = async {
            self.tx
                .send(reply_tx)
                .await
                .map_err(|_| format!("{} has stopped", self.name))?;
            reply_rx
                .await
                .map_err(|_| format!("{} dropped the liveness ping", self.name))
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(r) => r,
            Err(_) => Err(format!("{} did not answer within {:?}", self.name, timeout)),
        }
    }
}

/// The component's side.
#[derive(Debug)]
pub struct LivenessResponder {
    rx: mpsc::Receiver<oneshot::Sender<()>>,
}

impl LivenessResponder {
    /// Waits for the next ping and answers it. Returns `false` when the
    /// supervisor is gone.
    pub async fn answer_next(&mut self) -> bool {
        match self.rx.recv().await {
            Some(reply) => {
                let _ = reply.send(());
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answered_ping_passes() {
        let (probe, mut resp) = pair("x");
        let task = tokio::spawn(async move { while resp.answer_next().await {} });
        probe.check(Duration::from_secs(1)).await.unwrap();
        probe.check(Duration::from_secs(1)).await.unwrap();
        task.abort();
    }

    #[tokio::test]
    async fn wedged_component_fails() {
        let (probe, _resp) = pair("wedged");
        let e = probe.check(Duration::from_millis(50)).await.unwrap_err();
        assert!(e.contains("wedged did not answer"), "{e}");
    }

    #[tokio::test]
    async fn stopped_component_fails() {
        let (probe, resp) = pair("gone");
        drop(resp);
        let e = probe.check(Duration::from_millis(50)).await.unwrap_err();
        assert!(e.contains("gone has stopped"), "{e}");
    }
}
