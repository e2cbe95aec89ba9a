//! What changed about a backend, as a value. The pool's mutations return the transitions they made;
//! [`Transition::publish`] is the one place that turns each into a log line and an event for
//! `/events` and the dashboard, so every state change is logged and streamed exactly once, the same way.

use std::net::SocketAddr;
use std::time::Duration;

use super::backend::State;
use super::membership::Source;
use super::tiers::TierChange;
use crate::config::{OnDown, OnRemoved};
use crate::events::{Event, EventBus};
use crate::health::{AgentSays, Health};

/// A change of one backend's membership, state or eligibility.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Transition {
    /// A source claimed a new address (or one that left recently came back).
    Added {
        backend: SocketAddr,
        weight: u32,
        tier: u32,
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
    DrainDeadline { backend: SocketAddr, sessions: u64 },
    /// Its sources (or the admin API) gave it another weight or tier.
    Reweighted {
        backend: SocketAddr,
        weight: u32,
        tier: u32,
    },
    /// The admin API set it active, draining or in maintenance.
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
    Returned { backend: SocketAddr },
    /// Its agent said something new about its state or weight share.
    Agent {
        backend: SocketAddr,
        says: AgentSays,
        was: AgentSays,
        weight_pct: u32,
        sessions: u64,
    },
    /// Another tier serves; or (`held`) a better tier is eligible and `failback` keeps traffic on
    /// the serving one.
    Tier { change: TierChange, held: bool },
}

impl Transition {
    /// Logs the transition and publishes it as an event of `service`.
    pub(crate) fn publish(&self, service: &str, events: &EventBus) {
        self.log(service);
        events.publish(self.event(service));
    }

    /// The transition's log line: a warning when the backend got worse, else information.
    fn log(&self, service: &str) {
        match self {
            Transition::Added {
                backend,
                weight,
                sources,
                probed,
                tier,
            } => {
                let source = sources.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                tracing::info!(service, backend = %backend, weight, tier, source = source.join(","), probed, "backend added");
            }
            Transition::Removed {
                backend,
                sessions,
                on_removed,
            } => {
                tracing::info!(service, backend = %backend, sessions, on_removed = on_removed.as_str(), "backend removed");
            }
            Transition::DrainDeadline { backend, sessions } => {
                tracing::info!(service, backend = %backend, sessions, "removed backend's drain deadline: closing its sessions");
            }
            Transition::Reweighted {
                backend,
                weight,
                tier,
            } => {
                tracing::info!(service, backend = %backend, weight, tier, "backend weight or tier changed");
            }
            Transition::State {
                backend,
                state,
                sessions,
            } => {
                tracing::info!(service, backend = %backend, state = state.as_str(), sessions, "backend state changed");
            }
            Transition::Health {
                backend,
                health,
                was,
                ..
            } if *health == Health::Healthy => {
                tracing::info!(service, backend = %backend, was = was.as_str(), "backend healthy");
            }
            Transition::Health {
                backend,
                was,
                error,
                on_down,
                sessions,
                ..
            } => {
                tracing::warn!(service, backend = %backend, was = was.as_str(),
                    error = error.as_deref().unwrap_or(""), on_down = on_down.as_str(), sessions,
                    "backend unhealthy");
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
            }
            Transition::Returned { backend } => {
                tracing::info!(service, backend = %backend, "backend returned after cool-down");
            }
            Transition::Agent {
                backend,
                says,
                was,
                weight_pct,
                sessions,
            } => {
                if says.allows() && *weight_pct > 0 {
                    tracing::info!(service, backend = %backend, agent = says.as_str(), was = was.as_str(), weight_pct, "backend's agent says");
                } else {
                    tracing::warn!(service, backend = %backend, agent = says.as_str(), was = was.as_str(), weight_pct, sessions, "backend's agent takes it out of rotation");
                }
            }
            Transition::Tier { change, held: true } => {
                tracing::warn!(service, serving_tier = change.to, "a better tier is eligible again: failback keeps traffic on the serving tier until an operator asks (POST /services/NAME/failback) or its wait ends");
            }
            Transition::Tier { change, .. } => {
                let from = change
                    .from
                    .map_or_else(|| "none".to_string(), |t| t.to_string());
                tracing::warn!(service, serving_tier = change.to, was = from, reason = %change.reason, "serving tier changed");
            }
        }
    }

    /// The transition as `/events` streams it.
    fn event<'a>(&'a self, service: &'a str) -> Event<'a> {
        match self {
            Transition::Added {
                backend,
                weight,
                tier,
                sources,
                ..
            } => Event::BackendAdded {
                service,
                backend: *backend,
                weight: *weight,
                tier: *tier,
                sources: sources.iter().map(|s| s.to_string()).collect(),
            },
            Transition::Removed {
                backend,
                sessions,
                on_removed,
            } => Event::BackendRemoved {
                service,
                backend: *backend,
                sessions: *sessions,
                on_removed: on_removed.as_str(),
            },
            Transition::DrainDeadline { backend, sessions } => Event::BackendDrainDeadline {
                service,
                backend: *backend,
                sessions: *sessions,
            },
            Transition::Reweighted {
                backend,
                weight,
                tier,
            } => Event::BackendWeight {
                service,
                backend: *backend,
                weight: *weight,
                tier: *tier,
            },
            Transition::State { backend, state, .. } => Event::BackendState {
                service,
                backend: *backend,
                state: state.as_str(),
            },
            Transition::Health {
                backend,
                health,
                was,
                error,
                ..
            } => Event::BackendHealth {
                service,
                backend: *backend,
                health: health.as_str(),
                was: was.as_str(),
                error: error.as_deref(),
            },
            Transition::Ejected {
                backend,
                consecutive_fails,
                ..
            } => Event::BackendEjected {
                service,
                backend: *backend,
                consecutive_fails: *consecutive_fails,
            },
            Transition::Returned { backend } => Event::BackendReturned {
                service,
                backend: *backend,
            },
            Transition::Agent {
                backend,
                says,
                was,
                weight_pct,
                ..
            } => Event::BackendAgent {
                service,
                backend: *backend,
                says: says.as_str(),
                was: was.as_str(),
                weight_pct: *weight_pct,
            },
            Transition::Tier { change, held } => Event::ServiceTier {
                service,
                serving: change.to,
                was: change.from,
                reason: change.reason.as_str(),
                held: *held,
            },
        }
    }
}
