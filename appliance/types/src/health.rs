//! Component health, probes and the status report.
//!
//! Every component of the daemon reports one [`ComponentState`] with a human
//! reason. The daemon folds them into a score between 0.0 and 1.0 and the three
//! probes ([`Probe::Live`], [`Probe::Ready`], [`Probe::Startup`]). The rules are
//! pure functions here so the CLI and tests agree with the daemon on them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The state a component reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    /// Still initialising; not serving yet.
    Starting,
    /// Serving normally.
    Ready,
    /// Serving, but with reduced function or safety (for example a DEGRADED pool).
    Degraded,
    /// Cannot serve because something it needs is absent (for example no ZFS).
    /// This is an expected condition of the environment, not a fault.
    Unavailable,
    /// Broken: it tried and failed, and needs attention.
    Failed,
}

impl ComponentState {
    /// All states, in display order.
    pub const ALL: [ComponentState; 5] = [
        ComponentState::Starting,
        ComponentState::Ready,
        ComponentState::Degraded,
        ComponentState::Unavailable,
        ComponentState::Failed,
    ];

    /// The lowercase name used on the wire, in metrics and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Starting => "starting",
            ComponentState::Ready => "ready",
            ComponentState::Degraded => "degraded",
            ComponentState::Unavailable => "unavailable",
            ComponentState::Failed => "failed",
        }
    }

    /// The contribution of one component to the health score.
    ///
    /// Ready counts fully and degraded half: it still serves, but something is
    /// wrong. Starting, unavailable and failed components serve nothing.
    pub fn score(self) -> f64 {
        match self {
            ComponentState::Ready => 1.0,
            ComponentState::Degraded => 0.5,
            ComponentState::Starting | ComponentState::Unavailable | ComponentState::Failed => 0.0,
        }
    }
}

impl fmt::Display for ComponentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component's health as reported in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// Component name (`control`, `metrics`, `storage`, ...).
    pub name: String,
    /// Current state.
    pub state: ComponentState,
    /// Why it is in this state, in words an operator can act on.
    pub reason: String,
    /// Whether the appliance needs this component to be ready. An optional
    /// component that is `unavailable` does not fail the ready probe and is
    /// left out of the score (the environment simply lacks it).
    pub required: bool,
}

/// The three probes, in the Kubernetes sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// The daemon's main loop and components still answer.
    Live,
    /// The daemon can serve: start-up is over and no required component is
    /// failed, unavailable or still starting.
    Ready,
    /// Start-up has finished: every component has left `starting`.
    Startup,
}

impl Probe {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Probe::Live => "live",
            Probe::Ready => "ready",
            Probe::Startup => "startup",
        }
    }
}

/// Result of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Which probe.
    pub probe: Probe,
    /// Whether it passes.
    pub pass: bool,
    /// Why it fails (empty when it passes).
    pub reason: String,
}

/// All three probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probes {
    /// See [`Probe::Live`].
    pub live: ProbeResult,
    /// See [`Probe::Ready`].
    pub ready: ProbeResult,
    /// See [`Probe::Startup`].
    pub startup: ProbeResult,
}

impl Probes {
    /// The result of one probe.
    pub fn get(&self, probe: Probe) -> &ProbeResult {
        match probe {
            Probe::Live => &self.live,
            Probe::Ready => &self.ready,
            Probe::Startup => &self.startup,
        }
    }
}

/// The health score: the mean of the components' [`ComponentState::score`],
/// leaving out optional components that are `unavailable`. With nothing to
/// count, the score is 0.0 (nothing serves).
pub fn score(components: &[ComponentHealth]) -> f64 {
    let counted: Vec<f64> = components
        .iter()
        .filter(|c| c.required || c.state != ComponentState::Unavailable)
        .map(|c| c.state.score())
        .collect();
    if counted.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)] // a handful of components
    let n = counted.len() as f64;
    counted.iter().sum::<f64>() / n
}

/// Computes the three probes from the components and whether the main loop
/// answered (`loop_alive`).
pub fn probes(components: &[ComponentHealth], loop_alive: bool) -> Probes {
    let still_starting: Vec<&str> = components
        .iter()
        .filter(|c| c.state == ComponentState::Starting)
        .map(|c| c.name.as_str())
        .collect();
    let startup = if still_starting.is_empty() {
        pass(Probe::Startup)
    } else {
        fail(
            Probe::Startup,
            format!("still starting: {}", still_starting.join(", ")),
        )
    };

    let blocking: Vec<String> = components
        .iter()
        .filter(|c| match c.state {
            ComponentState::Ready | ComponentState::Degraded => false,
            ComponentState::Unavailable => c.required,
            ComponentState::Starting | ComponentState::Failed => true,
        })
        .map(|c| format!("{} is {} ({})", c.name, c.state, c.reason))
        .collect();
    let ready = if blocking.is_empty() {
        pass(Probe::Ready)
    } else {
        fail(Probe::Ready, blocking.join("; "))
    };

    let live = if loop_alive {
        pass(Probe::Live)
    } else {
        fail(
            Probe::Live,
            "the daemon's main loop did not answer".to_owned(),
        )
    };
    Probes {
        live,
        ready,
        startup,
    }
}

fn pass(probe: Probe) -> ProbeResult {
    ProbeResult {
        probe,
        pass: true,
        reason: String::new(),
    }
}

fn fail(probe: Probe, reason: String) -> ProbeResult {
    ProbeResult {
        probe,
        pass: false,
        reason,
    }
}

/// What `appliancectl status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Daemon version (crate version).
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The three probes.
    pub probes: Probes,
    /// Health score between 0.0 and 1.0.
    pub score: f64,
    /// Every component.
    pub components: Vec<ComponentHealth>,
    /// Addresses the daemon listens on, keyed by name (`control`, `metrics`,
    /// `bus_nats`, `cache_resp`, `sync_quic`).
    pub endpoints: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, state: ComponentState, required: bool) -> ComponentHealth {
        ComponentHealth {
            name: name.into(),
            state,
            reason: format!("{name} says so"),
            required,
        }
    }

    #[test]
    fn score_all_ready_is_one() {
        let cs = [
            c("a", ComponentState::Ready, true),
            c("b", ComponentState::Ready, false),
        ];
        assert!((score(&cs) - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn score_counts_degraded_half_and_skips_optional_unavailable() {
        let cs = [
            c("a", ComponentState::Ready, true),
            c("b", ComponentState::Degraded, true),
            c("storage", ComponentState::Unavailable, false),
        ];
        assert!((score(&cs) - 0.75).abs() < 1e-9);
        let cs = [
            c("a", ComponentState::Ready, true),
            c("storage", ComponentState::Unavailable, true),
        ];
        assert!((score(&cs) - 0.5).abs() < 1e-9);
        assert!(score(&[]).abs() < f64::EPSILON);
    }

    #[test]
    fn probes_follow_component_states() {
        let cs = [
            c("control", ComponentState::Ready, true),
            c("storage", ComponentState::Unavailable, false),
        ];
        let p = probes(&cs, true);
        assert!(p.live.pass && p.ready.pass && p.startup.pass);

        let cs = [
            c("control", ComponentState::Ready, true),
            c("storage", ComponentState::Starting, false),
        ];
        let p = probes(&cs, true);
        assert!(!p.startup.pass);
        assert!(p.startup.reason.contains("storage"));
        assert!(!p.ready.pass);

        let cs = [c("storage", ComponentState::Unavailable, true)];
        let p = probes(&cs, true);
        assert!(p.startup.pass);
        assert!(!p.ready.pass);
        assert!(p.ready.reason.contains("storage is unavailable"));

        let cs = [c("storage", ComponentState::Failed, false)];
        assert!(!probes(&cs, true).ready.pass);

        let p = probes(&[c("x", ComponentState::Degraded, true)], false);
        assert!(!p.live.pass);
        assert!(p.ready.pass);
    }
}
