//! What changed about a backend, as a value. The pool's mutations return the transitions they made;
//! [`Transition::publish`] is the one place that turns each into a log line and an event for
//! `/events` and the dashboard, so every state change is logged and streamed exactly once, the same way.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::backend::State;
use super::membership::Source;
use crate::config::{OnDown, OnRemoved};
use crate::events::EventBus;
use crate::health::Health;

/// A change of one backend's membership, state or eligibility.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Transition {
    /// A source claimed a new address (or one that left recently came back).
    Added {
        backend: SocketAddr,
        weight: u32,
        sources: Vec<Source>,
        probed: bool,
    },
    /// No source claims it any more; its sessions follow `on_removed`.
    Removed {
        backend: SocketAddr,
        sessions: u64,
        on_removed: OnRemoved,
    },
    /// The removed backend's drain deadline passed with sessions left: they are cut.
    DrainDeadline {
        backend: SocketAddr,
        sessions: u64,
    },
    Reweighted {
        backend: SocketAddr,
        weight: u32,
    },
    /// The admin API set it active or draining.
    State {
        backend: SocketAddr,
        state: State,
        sessions: u64,
    },
    /// Active health changed; when unhealthy with `on_down: close` its sessions were cut.
    Health {
        backend: SocketAddr,
        health: Health,
        was: Health,
        error: Option<String>,
        on_down: OnDown,
        sessions: u64,
    },
    /// Passive health: ejected after consecutive connect failures.
    Ejected {
        backend: SocketAddr,
        consecutive_fails: u32,
        cooldown: Duration,
    },
    /// The ejection's cool-down ended.
    Returned {
        backend: SocketAddr,
    },
}

impl Transition {
    /// Logs the transition and publishes it as an event of `service`.
    pub(crate) fn publish(&self, service: &str, events: &EventBus) {
        match self {
            Transition::Added {
                backend,
                weight,
                sources,
                probed,
            } => {
                let srcs: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
                tracing::info!(service, backend = %backend, weight, source = srcs.join(","), probed, "backend added");
                events.publish(
                    "backend_added",
                    json!({"service": service, "backend": backend, "weight": weight, "sources": srcs}),
                );
            }
            Transition::Removed {
                backend,
                sessions,
                on_removed,
            } => {
                tracing::info!(service, backend = %backend, sessions, on_removed = on_removed.as_str(), "backend removed");
                events.publish(
                    "backend_removed",
                    json!({"service": service, "backend": backend, "sessions": sessions,
                           "on_removed": on_removed.as_str()}),
                );
            }
            Transition::DrainDeadline { backend, sessions } => {
                tracing::info!(service, backend = %backend, sessions, "removed backend's drain deadline: closing its sessions");
                events.publish(
                    "backend_drain_deadline",
                    json!({"service": service, "backend": backend, "sessions": sessions}),
                );
            }
            Transition::Reweighted { backend, weight } => {
                tracing::info!(service, backend = %backend, weight, "backend weight changed");
                events.publish(
                    "backend_weight",
                    json!({"service": service, "backend": backend, "weight": weight}),
                );
            }
            Transition::State {
                backend,
                state,
                sessions,
            } => {
                tracing::info!(service, backend = %backend, state = state.as_str(), sessions, "backend state changed");
                events.publish(
                    "backend_state",
                    json!({"service": service, "backend": backend, "state": state}),
                );
            }
            Transition::Health {
                backend,
                health,
                was,
                error,
                on_down,
                sessions,
            } => {
                if *health == Health::Healthy {
                    tracing::info!(service, backend = %backend, was = was.as_str(), "backend healthy");
                } else {
                    tracing::warn!(service, backend = %backend, was = was.as_str(),
                        error = error.as_deref().unwrap_or(""), on_down = on_down.as_str(), sessions,
                        "backend unhealthy");
                }
                events.publish(
                    "backend_health",
                    json!({"service": service, "backend": backend, "health": health, "was": was,
                           "error": error}),
                );
            }
            Transition::Ejected {
                backend,
                consecutive_fails,
                cooldown,
            } => {
                tracing::warn!(
                    service,
                    backend = %backend,
                    consecutive_fails,
                    cooldown_ms = cooldown.as_millis() as u64,
                    "backend ejected after consecutive connect failures"
                );
                events.publish(
                    "backend_ejected",
                    json!({"service": service, "backend": backend, "consecutive_fails": consecutive_fails}),
                );
            }
            Transition::Returned { backend } => {
                tracing::info!(service, backend = %backend, "backend returned after cool-down");
                events.publish(
                    "backend_returned",
                    json!({"service": service, "backend": backend}),
                );
            }
        }
    }
}
