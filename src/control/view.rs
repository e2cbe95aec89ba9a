//! The server's own numbers at one moment, read once: the top of a `/stats` frame and what
//! `/metrics` exports about the process as a whole.

use serde::Serialize;

use super::{Control, DrainProgress};
use crate::metrics::{Family, Kind, Subject, Table};

/// The server's state now: what `/stats` shows at its top level (these field names;
/// docs/admin-api.md) and what `/metrics` exports ([`METRICS`]).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ControlView {
    /// Which balancer replica this is (its host's name).
    pub(crate) instance: String,
    pub(crate) ready: bool,
    /// Draining after a stop signal (as the drain progress says).
    pub(crate) draining: bool,
    pub(crate) drain: DrainProgress,
    pub(crate) reloads: Reloads,
    /// Not draining, as the readiness says (metrics only).
    #[serde(skip)]
    pub(crate) serving: bool,
    /// Client connections open over every service (metrics only).
    #[serde(skip)]
    pub(crate) connections_open: u64,
}

/// Config reloads so far.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Reloads {
    pub(crate) applied: u64,
    pub(crate) rejected: u64,
}

impl Control {
    /// Its state now.
    pub(crate) fn view(&self) -> ControlView {
        let (applied, rejected) = self.reload_counts();
        let drain = self.drain_progress();
        ControlView {
            instance: self.instance().to_string(),
            ready: self.readiness.is_ready(),
            draining: drain.draining,
            drain,
            reloads: Reloads { applied, rejected },
            serving: !self.readiness.is_draining(),
            connections_open: self.gate.open(),
        }
    }
}

impl Subject for ControlView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

/// What `/metrics` exports about the server as a whole.
pub(crate) const METRICS: Table<ControlView> = Table {
    subject: &[],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_instance_info",
            "Always 1: which balancer replica this is (its host's name), to tell replicas apart.",
            &["hostname"],
            |c, o| o.put(&[&c.instance], 1u64),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_serving",
            "1 while the process serves; 0 once it drains.",
            &[],
            |c, o| o.put(&[], c.serving),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_connections_open",
            "Client connections open now over every service (what the top-level max_connections caps).",
            &[],
            |c, o| o.put(&[], c.connections_open),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_draining",
            "1 while the process drains after a stop signal.",
            &[],
            |c, o| o.put(&[], c.drain.draining),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_drain_remaining_connections",
            "Client connections still open during the drain.",
            &[],
            |c, o| o.put(&[], c.drain.remaining),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_drain_deadline_seconds",
            "Seconds until the drain deadline cuts what remains (0 when not draining).",
            &[],
            |c, o| {
                let secs = c.drain.deadline_in.map(|d| d.as_secs_f64());
                o.put(&[], secs.unwrap_or(0.0));
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_config_reloads_total",
            "Config reloads by result (applied, rejected).",
            &["result"],
            |c, o| {
                o.put(&["applied"], c.reloads.applied);
                o.put(&["rejected"], c.reloads.rejected);
            },
        ),
    ],
};
