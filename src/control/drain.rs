//! The stop sequence: keep accepting for `shutdown.delay` (so a balancer in front can take us out
//! first), close every listener, let in-flight connections finish, and when `shutdown.drain_timeout`
//! (counted from the signal) runs out, cut what remains with a reset. Connections are tracked with a
//! `TaskTracker`, so the drain ends right after the last one, never after a fixed sleep.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::Control;
use crate::events::Event;

/// How often drain progress is logged while connections remain.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where a drain stands.
#[derive(Debug, Clone, Serialize)]
pub struct DrainProgress {
    pub draining: bool,
    /// Client connections still open.
    pub remaining: u64,
    /// Until the deadline cuts what remains.
    #[serde(serialize_with = "ser_secs")]
    pub deadline_in: Option<Duration>,
    /// Since the stop signal.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Option<Duration>,
}

fn ser_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl Control {
    pub fn drain_progress(&self) -> DrainProgress {
        let drain = *self.drain.lock();
        let now = Instant::now();
        DrainProgress {
            draining: drain.is_some(),
            remaining: self.tracker.len() as u64,
            deadline_in: drain.map(|(_, cut)| cut.saturating_duration_since(now)),
            elapsed: drain.map(|(t, _)| now.duration_since(t)),
        }
    }

    /// Drains as described in the module docs; returns how many connections the deadline cut. Ends
    /// with every background task stopped and the worker threads joined.
    pub(crate) async fn drain(self: &Arc<Self>) -> usize {
        self.drain_from(false).await
    }

    /// [`Control::drain`]; after an upgrade handed the listeners over (`upgraded`) there is nothing
    /// to keep accepting for, so `shutdown.delay` is skipped.
    pub(crate) async fn drain_from(self: &Arc<Self>, upgraded: bool) -> usize {
        self.readiness.set(false, true);
        let shutdown = self.config.lock().shutdown.clone();
        let signalled = Instant::now();
        let cut_at = signalled + shutdown.drain_timeout.0;
        *self.drain.lock() = Some((signalled, cut_at));
        tracing::info!(
            delay_ms = shutdown.delay.0.as_millis() as u64,
            drain_timeout_ms = shutdown.drain_timeout.0.as_millis() as u64,
            in_flight = self.tracker.len(),
            "stop signal: draining"
        );
        self.events.publish(Event::Draining {
            in_flight: self.tracker.len(),
            deadline_s: shutdown.drain_timeout.0.as_secs_f64(),
        });
        if !upgraded {
            tokio::time::sleep(shutdown.delay.0).await;
        }
        for b in self.listeners.lock().iter_mut() {
            b.stop.cancel();
            // Closed now (the accept loops close theirs as they stop), not when the server goes.
            b.kept.take();
        }
        // UDP loops keep reading for their open sessions; new clients are refused.
        self.udp.drain();
        self.accepting.close();
        self.accepting.wait().await;
        self.tracker.close();
        tracing::info!(in_flight = self.tracker.len(), "listeners closed");

        let mut cut = 0;
        let mut progress =
            tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            tokio::select! {
                () = self.tracker.wait() => break,
                () = tokio::time::sleep_until(cut_at) => {
                    cut = self.tracker.len();
                    tracing::warn!(remaining = cut, "drain deadline reached: cutting remaining connections");
                    self.leaving.deadline.cancel();
                    self.cut_ring(crate::outcome::Outcome::DrainDeadline);
                    self.tracker.wait().await;
                    break;
                }
                _ = progress.tick() => {
                    let left = cut_at.saturating_duration_since(Instant::now());
                    tracing::info!(remaining = self.tracker.len(), deadline_in_ms = left.as_millis() as u64, "draining");
                }
            }
        }
        self.udp.stop();
        self.background.cancel();
        // Every session has ended: the worker threads have nothing left to run.
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            me.workers.stop();
            me.stop_ring();
        })
        .await;
        cut
    }
}
