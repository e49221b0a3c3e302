//! The registry of component health.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use appliance_types::health::{ComponentHealth, ComponentState};
use tracing::{debug, info, warn};

/// Shared registry; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct HealthRegistry {
    inner: Arc<Mutex<BTreeMap<String, ComponentHealth>>>,
}

impl HealthRegistry {
    /// Registers a component in `starting` and returns its handle.
    pub fn register(&self, name: &str, required: bool) -> HealthHandle {
        self.lock().insert(
            name.to_owned(),
            ComponentHealth {
                name: name.to_owned(),
                state: ComponentState::Starting,
                reason: "starting".into(),
                required,
            },
        );
        HealthHandle {
            name: name.to_owned(),
            registry: self.clone(),
        }
    }

    /// A snapshot of every component, by name.
    pub fn snapshot(&self) -> Vec<ComponentHealth> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ComponentHealth>> {
        // The map holds plain data; a panic elsewhere cannot leave it torn.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogLevel {
    Warn,
    Info,
    Debug,
}

/// How a component's update is logged: a new state always (a warning for
/// `failed` and `degraded`); a new reason under the same state too, except
/// while `ready`, where the reason is a running figure (the bus's count of
/// stored messages, the cache's entries) that would log a line every few
/// seconds for as long as the box runs.
fn log_level(from: ComponentState, to: ComponentState, reason_changed: bool) -> Option<LogLevel> {
    let bad = matches!(to, ComponentState::Failed | ComponentState::Degraded);
    if from != to {
        Some(if bad { LogLevel::Warn } else { LogLevel::Info })
    } else if !reason_changed {
        None
    } else if bad {
        Some(LogLevel::Warn)
    } else if to == ComponentState::Ready {
        Some(LogLevel::Debug)
    } else {
        Some(LogLevel::Info)
    }
}

/// One component's handle for reporting its state.
#[derive(Debug, Clone)]
pub struct HealthHandle {
    name: String,
    registry: HealthRegistry,
}

impl HealthHandle {
    /// Sets the state and reason; logs transitions (see [`log_level`]).
    pub fn set(&self, state: ComponentState, reason: impl Into<String>) {
        let reason = reason.into();
        let mut map = self.registry.lock();
        if let Some(c) = map.get_mut(&self.name) {
            match log_level(c.state, state, c.reason != reason) {
                Some(LogLevel::Warn) => {
                    warn!(component = %self.name, from = %c.state, to = %state, reason = %reason, "component state changed");
                }
                Some(LogLevel::Info) => {
                    info!(component = %self.name, from = %c.state, to = %state, reason = %reason, "component state changed");
                }
                Some(LogLevel::Debug) => {
                    debug!(component = %self.name, state = %state, reason = %reason, "component reason changed");
                }
                None => {}
            }
            c.state = state;
            c.reason = reason;
        }
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ComponentState::*;

    #[test]
    fn state_changes_are_logged_and_a_ready_components_running_figures_are_not() {
        assert_eq!(log_level(Starting, Ready, true), Some(LogLevel::Info));
        assert_eq!(log_level(Ready, Degraded, true), Some(LogLevel::Warn));
        assert_eq!(log_level(Degraded, Failed, false), Some(LogLevel::Warn));
        assert_eq!(log_level(Failed, Ready, true), Some(LogLevel::Info));
        // Same state, new reason: which disk is missing matters; the bus's
        // count of stored messages does not.
        assert_eq!(log_level(Degraded, Degraded, true), Some(LogLevel::Warn));
        assert_eq!(
            log_level(Unavailable, Unavailable, true),
            Some(LogLevel::Info)
        );
        assert_eq!(log_level(Ready, Ready, true), Some(LogLevel::Debug));
        assert_eq!(log_level(Ready, Ready, false), None);
        assert_eq!(log_level(Failed, Failed, false), None);
    }
}
