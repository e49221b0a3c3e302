//! The registry of component health.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use appliance_types::health::{ComponentHealth, ComponentState};
use tracing::{info, warn};

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

/// One component's handle for reporting its state.
#[derive(Debug, Clone)]
pub struct HealthHandle {
    name: String,
    registry: HealthRegistry,
}

impl HealthHandle {
    /// Sets the state and reason; logs transitions.
    pub fn set(&self, state: ComponentState, reason: impl Into<String>) {
        let reason = reason.into();
        let mut map = self.registry.lock();
        if let Some(c) = map.get_mut(&self.name) {
            if c.state != state || c.reason != reason {
                match state {
                    ComponentState::Failed | ComponentState::Degraded => {
                        warn!(component = %self.name, from = %c.state, to = %state, reason = %reason, "component state changed");
                    }
                    _ => {
                        info!(component = %self.name, from = %c.state, to = %state, reason = %reason, "component state changed");
                    }
                }
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
