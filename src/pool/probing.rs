//! Active health in a pool: the probe loop of each backend (it probes on its service's schedule,
//! keeps the result history and hands every rise/fall transition to the pool), the pool's side of a
//! transition, and the start-up wait for every first probe. The probe itself and the rise/fall
//! machine are `health`'s; this is the part that acts on them.
//!
//! The first probe runs at once, so a new backend gets traffic as soon as it answers; the second after
//! a random fraction of the interval, which spreads the probes of backends added together; then one
//! every interval. One probe is in flight at a time: the loop awaits each, bounded by its timeout.
//! A backend in maintenance (`State::Maint`) is not probed: its loop waits out each interval.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Backend, Inner, Pool, State, Transition};
use crate::config::OnDown;
use crate::health::{Health, Machine, ProbeError, ProbeRecord, ProbeSpec, Target};
use crate::outcome::Outcome;
use crate::util::{lock, Rng};

impl Pool {
    /// Starts (or restarts) `b`'s probe loop, when the pool is started and probes.
    pub(super) fn spawn_probes(&self, inner: &mut Inner, b: &Arc<Backend>) {
        let (Some(spec), Some(tasks)) = (self.settings().probes.clone(), &inner.tasks) else {
            return;
        };
        let stop = tasks.stop.child_token();
        if let Some(old) = inner.probe_tasks.insert(b.addr, stop.clone()) {
            old.cancel();
        }
        let machine = Machine::starting_at(spec.rise, spec.fall, b.health());
        let b = b.clone();
        inner.spawn(move |pool, _| probe_loop(pool, b, spec, machine, stop));
    }

    /// Applies a health transition reported by `b`'s probe loop.
    fn health_changed(
        &self,
        b: &Arc<Backend>,
        health: Health,
        error: Option<ProbeError>,
    ) -> Vec<Transition> {
        let ts = {
            let mut inner = lock(&self.inner);
            if !inner.members.iter().any(|m| Arc::ptr_eq(m, b)) {
                return Vec::new(); // removed meanwhile
            }
            let Some(was) = b.observe_health(health) else {
                return Vec::new();
            };
            let on_down = self.settings().on_down;
            if health != Health::Healthy {
                if on_down == OnDown::Close {
                    b.cut_sessions(Outcome::BackendDown);
                }
                self.nudge_dns(b);
            }
            self.rebuild_locked(&mut inner);
            vec![Transition::Health {
                backend: b.addr,
                health,
                was,
                error: error.map(|e| e.to_string()),
                on_down,
                sessions: b.active(),
            }]
        };
        self.publish(ts)
    }

    /// Waits until every member has been probed once, or `limit` passes. Without probes, returns at
    /// once.
    pub(crate) async fn wait_probed(&self, limit: Duration) {
        if self.settings().probes.is_none() {
            return;
        }
        let _ = tokio::time::timeout(limit, async {
            loop {
                let notified = self.probed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.members().iter().all(|b| b.probed_once()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

/// Probes `backend` until `stop` is cancelled, reporting every transition to `pool`.
async fn probe_loop(
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    spec: Arc<ProbeSpec>,
    mut machine: Machine,
    stop: CancellationToken,
) {
    let rng = Rng::from_entropy();
    let mut next = Instant::now();
    let mut first = true;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        if backend.state() == State::Maint {
            next = (next + spec.interval).max(started);
            continue;
        }
        let at = SystemTime::now();
        let host = backend.host_header();
        let dns_name = backend.dns_name();
        let target = Target {
            addr: backend.addr,
            host: &host,
            dns_name: dns_name.as_deref(),
        };
        let probed = tokio::select! {
            () = stop.cancelled() => return,
            r = spec.probe(target) => r,
        };
        let result = probed.result;
        let mut record = ProbeRecord::new(at, started.elapsed(), result.as_ref().err());
        if let Some(out) = &probed.output {
            record = record.with_output(out);
        }
        match result {
            // Our own exhaustion is no verdict on the backend: its health stays as it was.
            Err(e) if !e.is_verdict() => local_exhaustion(Some(&e)),
            result => {
                local_exhaustion(None);
                if let Some(health) = machine.record(result.is_ok()) {
                    pool.health_changed(&backend, health, result.err());
                }
            }
        }
        // Recorded once its verdict is applied: the start-up wait (`wait_probed`) then finds the
        // snapshot built with it.
        backend.record_probe(record);
        pool.probed.notify_waiters();
        let interval = spec.interval;
        next = if first {
            first = false;
            let phase = interval.mul_f64((rng.below(1000) + 1) as f64 / 1000.0);
            started + phase
        } else {
            (next + interval).max(Instant::now())
        };
    }
}

/// Logs once per streak, for the whole process, that probes fail for want of local resources (they
/// give no verdict meanwhile), and once when a probe gets a verdict again.
fn local_exhaustion(error: Option<&ProbeError>) {
    static STREAK: AtomicBool = AtomicBool::new(false);
    match error {
        Some(e) if !STREAK.swap(true, Relaxed) => tracing::warn!(
            error = %e,
            "health probes cannot open sockets: no verdict on any backend until local resources return"
        ),
        None if STREAK.load(Relaxed) && STREAK.swap(false, Relaxed) => {
            tracing::info!("health probes give verdicts again")
        }
        _ => {}
    }
}
