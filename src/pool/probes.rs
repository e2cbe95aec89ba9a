//! The probe loop of one backend: probes it on its service's schedule, keeps the result history, and
//! hands every rise/fall transition to the pool. The probe itself and the rise/fall machine are in
//! `health`; this is the part that acts on them.
//!
//! The first probe runs at once, so a new backend gets traffic as soon as it answers; the second after
//! a random fraction of the interval, which spreads the probes of backends added together; then one
//! every interval. One probe is in flight at a time: the loop awaits each, bounded by its timeout.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Backend, Pool};
use crate::health::{Machine, ProbeRecord, ProbeSpec};
use crate::util::Rng;

/// Probes `backend` until `stop` is cancelled, reporting every transition to `pool`.
pub(super) async fn probe_loop(
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
        let at = SystemTime::now();
        let host = backend.host_header();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = spec.probe(backend.addr, &host) => r,
        };
        let record = ProbeRecord::new(at, started.elapsed(), result.as_ref().err());
        backend.record_probe(record);
        if let Some(health) = machine.record(result.is_ok()) {
            pool.health_changed(&backend, health, result.err());
        }
        pool.probed();
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
