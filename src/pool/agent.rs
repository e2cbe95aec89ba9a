//! The agent check in a pool: each backend's agent loop asks the agent on the backend's host (at
//! the service's `agent.port`) every `agent.interval`, keeps its answers in a history, and hands a
//! change of what it says to the pool, which rebuilds the snapshot. What the agent protocol means
//! and how a line is read are `health::agent`'s.
//!
//! An agent that cannot be reached, or that answers garbage, changes nothing: the failure goes into
//! the history and the log (once per streak), and the backend keeps what the agent said last.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Backend, Inner, Pool, State, Transition};
use crate::config::AgentConfig;
use crate::health::{ask_agent, AgentReply, ProbeRecord};
use crate::util::{lock, Rng};

impl Pool {
    /// Starts (or restarts) `b`'s agent loop, when the pool is started and has an agent.
    pub(super) fn spawn_agent(&self, inner: &mut Inner, b: &Arc<Backend>) {
        let (Some(cfg), Some(tasks)) = (self.settings().agent.clone(), &inner.tasks) else {
            return;
        };
        let stop = tasks.stop.child_token();
        if let Some(old) = inner.agent_tasks.insert(b.addr, stop.clone()) {
            old.cancel();
        }
        let b = b.clone();
        inner.spawn(move |pool, _| agent_loop(pool, b, cfg, stop));
    }

    /// Applies what `b`'s agent said, when it changes something.
    fn agent_said(&self, b: &Arc<Backend>, reply: AgentReply) -> Vec<Transition> {
        let ts = {
            let mut inner = lock(&self.inner);
            if !inner.members.iter().any(|m| Arc::ptr_eq(m, b)) {
                return Vec::new(); // removed meanwhile
            }
            let (was_says, _) = b.agent();
            let says = reply.says.unwrap_or(was_says);
            let Some((was, _)) = b.observe_agent(says, reply.pct) else {
                return Vec::new();
            };
            self.rebuild_locked(&mut inner);
            let (says, weight_pct) = b.agent();
            vec![Transition::Agent {
                backend: b.addr,
                says,
                was,
                weight_pct,
                sessions: b.active(),
            }]
        };
        self.publish(ts)
    }
}

/// Asks `backend`'s agent until `stop` is cancelled; the first time at once, then every interval
/// (the second after a random fraction of it, which spreads the agents of backends added together).
async fn agent_loop(
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    cfg: AgentConfig,
    stop: CancellationToken,
) {
    let rng = Rng::from_entropy();
    let addr = std::net::SocketAddr::new(backend.addr.ip(), cfg.port);
    let interval = cfg.interval.0.max(Duration::from_millis(10));
    let mut next = Instant::now();
    let mut first = true;
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        if backend.state() != State::Maint {
            let at = SystemTime::now();
            let (result, raw) = tokio::select! {
                () = stop.cancelled() => return,
                r = ask_agent(addr, cfg.timeout.0) => r,
            };
            let record =
                ProbeRecord::new(at, started.elapsed(), result.as_ref().err()).with_output(&raw);
            backend.record_agent(record);
            match result {
                Ok(reply) => {
                    failing = false;
                    pool.agent_said(&backend, reply);
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(service = %pool.service, backend = %backend.addr, agent = %addr, error = %e, "backend's agent gave no usable answer: keeping what it said last");
                }
                Err(_) => {}
            }
        }
        next = if first {
            first = false;
            started + interval.mul_f64((rng.below(1000) + 1) as f64 / 1000.0)
        } else {
            (next + interval).max(Instant::now())
        };
    }
}
