//! What the admin API changes in a pool: backends added or removed whatever their sources, weights
//! set over the sources', and the drain state. Each is validated whole, then goes through the pool's
//! one membership path ([`Pool::mutate_membership`]) or one backend transition, and returns what
//! changed.

use std::net::SocketAddr;

use super::{Inner, Pool, State, Transition};
use crate::config::OnRemoved;
use crate::config::Weight;
use crate::health::Health;
use crate::util::lock;

/// Why an admin operation on a pool was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AdminError {
    #[error("{0} is already a backend of this service")]
    Exists(SocketAddr),
    #[error("{0} is not a backend of this service")]
    NotFound(SocketAddr),
    #[error("{0}")]
    Invalid(String),
    /// The service has as many backends added through the admin API as it may.
    #[error("this service has {0} backends added through the admin API, the most allowed (the limit per service is {MAX_API_BACKENDS}); remove one first")]
    ApiLimit(usize),
    /// The pool is as large as the admin API lets it grow.
    #[error("this service has {0} backends, the most the admin API adds to (the limit is {MAX_API_POOL} members)")]
    PoolFull(usize),
}

/// Backends the admin API may add to one service. The API is for an operator or an orchestrator
/// adding backends one by one; sets larger than this belong in the config or in DNS, whose sizes
/// are bounded by the file and by `discovery.max_records`.
pub(crate) const MAX_API_BACKENDS: usize = 1_000;
/// The admin API adds nothing to a pool that already has this many members, whatever their
/// sources: every snapshot, policy and stats frame costs time and memory per member.
pub(crate) const MAX_API_POOL: usize = 10_000;

impl Inner {
    /// `Ok` when `addr` is a member, the API's refusal otherwise.
    fn must_have(&self, addr: SocketAddr) -> Result<(), AdminError> {
        match self.members.iter().any(|b| b.addr == addr) {
            true => Ok(()),
            false => Err(AdminError::NotFound(addr)),
        }
    }
}

impl Pool {
    /// Adds `addr` as a backend claimed by the admin API (it also lifts an earlier API removal).
    pub(crate) fn add_api(
        &self,
        addr: SocketAddr,
        weight: Weight,
    ) -> Result<Vec<Transition>, AdminError> {
        self.change_claims(|inner| {
            if inner.members.iter().any(|b| b.addr == addr) {
                return Err(AdminError::Exists(addr));
            }
            let api = inner.membership.api_claims();
            if api >= MAX_API_BACKENDS {
                return Err(AdminError::ApiLimit(api));
            }
            if inner.members.len() >= MAX_API_POOL {
                return Err(AdminError::PoolFull(inner.members.len()));
            }
            inner.membership.add_api(addr, weight);
            Ok(())
        })
    }

    /// An API change of the claims that removes nobody on purpose: whoever it removes follows the
    /// service's `on_removed`.
    fn change_claims(
        &self,
        change: impl FnOnce(&mut Inner) -> Result<(), AdminError>,
    ) -> Result<Vec<Transition>, AdminError> {
        let on_removed = self.settings().on_removed;
        self.mutate_membership(change, |_| on_removed)
    }

    /// Removes `addr` whatever its sources, until the admin API adds it again; its sessions are
    /// drained (until `discovery.drain_timeout`) or, with `close`, cut at once.
    pub(crate) fn remove_api(
        &self,
        addr: SocketAddr,
        close: bool,
    ) -> Result<Vec<Transition>, AdminError> {
        let policy = if close {
            OnRemoved::Close
        } else {
            OnRemoved::Drain
        };
        let on_removed = self.settings().on_removed;
        self.mutate_membership(
            |inner| {
                inner.must_have(addr)?;
                inner.membership.remove_api(addr);
                Ok(())
            },
            |a| if a == addr { policy } else { on_removed },
        )
    }

    /// Sets `addr`'s weight over what its sources say (kept across reconciles and reloads).
    pub(crate) fn set_weight(
        &self,
        addr: SocketAddr,
        weight: Weight,
    ) -> Result<Vec<Transition>, AdminError> {
        self.change_claims(|inner| {
            inner.must_have(addr)?;
            inner.membership.override_weight(addr, weight);
            Ok(())
        })
    }

    /// Sets whether `addr` takes new connections (`Draining` keeps its sessions, sends it none;
    /// `Maint` also pauses its probes and its agent; leaving `Maint`, it takes new connections again
    /// once a probe passes).
    pub(crate) fn set_state(
        &self,
        addr: SocketAddr,
        state: State,
    ) -> Result<Vec<Transition>, AdminError> {
        if state == State::Removed {
            return Err(AdminError::Invalid(
                "state must be active, draining or maint".into(),
            ));
        }
        let ts = {
            let mut inner = lock(&self.inner);
            let b = inner
                .members
                .iter()
                .find(|b| b.addr == addr)
                .cloned()
                .ok_or(AdminError::NotFound(addr))?;
            let was = b.state();
            if !b.set_state(state) {
                return Ok(Vec::new());
            }
            let mut ts = vec![Transition::State {
                backend: addr,
                state,
                sessions: b.active(),
            }];
            if was == State::Maint && self.settings().probes.is_some() {
                // What its probes said before the maintenance says nothing of it now: it needs a
                // fresh pass (its probe loop starts again at once) before new connections.
                if let Some(was) = b.forget_health() {
                    ts.push(Transition::Health {
                        backend: addr,
                        health: Health::Unknown,
                        was,
                        error: None,
                        on_down: self.settings().on_down,
                        sessions: b.active(),
                    });
                }
                self.spawn_probes(&mut inner, &b);
            }
            self.rebuild_locked(&mut inner);
            ts
        };
        Ok(self.publish(ts))
    }
}
