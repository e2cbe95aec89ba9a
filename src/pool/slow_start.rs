//! Slow start: a backend that becomes eligible after start-up (it recovered, or it joined late) takes
//! new connections at a weight that ramps from a tenth of its own to all of it over `slow_start`. The
//! ramp of each backend is a [`Ramp`] (pure, tested here); the pool rebuilds its snapshot in steps
//! while any backend ramps ([`Pool::keep_ramping`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Inner, Pool, WEIGHT_SCALE};
use crate::util::lock;

/// The effective weight, in [`WEIGHT_SCALE`] units, of a backend whose full weight is `full` units
/// and whose ramp began `elapsed` ago over a `window`; `None` once the ramp is over. Starts at a
/// tenth of the full weight and grows linearly.
pub(super) fn ramped(full: u32, elapsed: Duration, window: Duration) -> Option<u32> {
    if elapsed >= window {
        return None;
    }
    let frac = elapsed.as_secs_f64() / window.as_secs_f64();
    Some(((full as f64 * frac) as u32).clamp((full / WEIGHT_SCALE).max(1), full))
}

/// One backend's ramp: whether one runs and since when, and what makes its next eligibility a
/// ramped one.
#[derive(Debug, Default)]
pub(super) struct Ramp {
    since: Option<Instant>,
    /// Has been eligible before: becoming eligible again is a recovery.
    ever_ready: bool,
    /// Joined after start-up: its first eligibility is ramped too. (The members present at start-up
    /// start together, and a ramp would only slow the start.)
    joined_late: bool,
}

impl Ramp {
    /// The backend (re)joined; `late` when start-up was over.
    pub(super) fn joined(&mut self, late: bool) {
        self.joined_late = late;
    }

    /// The effective weight of an eligible backend whose full weight is `full` [`WEIGHT_SCALE`] units,
    /// at `now`, and whether it is still ramping. `newly` says it was not eligible in the previous snapshot: that starts a ramp,
    /// unless this is its first eligibility since start-up.
    pub(super) fn step(
        &mut self,
        full: u32,
        newly: bool,
        window: Duration,
        now: Instant,
    ) -> (u32, bool) {
        let recovery = std::mem::replace(&mut self.ever_ready, true) || self.joined_late;
        if newly && recovery && !window.is_zero() {
            self.since = Some(now);
        }
        match self
            .since
            .and_then(|t| ramped(full, now.duration_since(t), window))
        {
            Some(w) => (w, true),
            None => {
                self.since = None;
                (full, false)
            }
        }
    }

    pub(super) fn ramping(&self) -> bool {
        self.since.is_some()
    }
}

impl Pool {
    /// While some backend ramps, rebuilds the snapshot ten times over the window (never more often
    /// than every 50 ms), so its weight grows; one such task per pool. Called with the lock held.
    pub(super) fn keep_ramping(&self, inner: &mut Inner, window: Duration) {
        if inner.ramp_task || inner.tasks.is_none() {
            return;
        }
        inner.ramp_task = true;
        let step = (window / 10).max(Duration::from_millis(50));
        inner.spawn(move |pool: Arc<Pool>, stop| async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(step) => {}
                }
                let done = {
                    let mut inner = lock(&pool.inner);
                    pool.rebuild_locked(&mut inner);
                    let done = !inner.members.iter().any(|b| b.ramping());
                    if done {
                        inner.ramp_task = false;
                    }
                    done
                };
                pool.publish(Vec::new());
                if done {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_ramps_from_a_tenth_to_full() {
        let w = Duration::from_secs(10);
        assert_eq!(ramped(30, Duration::ZERO, w), Some(3), "a tenth of 3 × 10");
        assert_eq!(ramped(30, Duration::from_secs(5), w), Some(15));
        assert_eq!(ramped(30, Duration::from_millis(9_999), w), Some(29));
        assert_eq!(ramped(30, w, w), None, "over: full weight");
    }

    #[test]
    fn recoveries_and_late_joiners_ramp_but_start_up_members_do_not() {
        let (w, t0) = (Duration::from_secs(10), Instant::now());
        let mut start_up = Ramp::default();
        assert_eq!(
            start_up.step(20, true, w, t0),
            (20, false),
            "first eligibility at start"
        );
        assert_eq!(start_up.step(20, false, w, t0 + w / 2), (20, false));
        // It goes down and comes back: a recovery.
        assert_eq!(start_up.step(20, true, w, t0 + w), (2, true));
        assert_eq!(start_up.step(20, false, w, t0 + w + w / 2), (10, true));
        assert!(start_up.ramping());
        assert_eq!(start_up.step(20, false, w, t0 + 2 * w), (20, false), "over");
        assert!(!start_up.ramping());

        let mut late = Ramp::default();
        late.joined(true);
        assert_eq!(
            late.step(10, true, w, t0),
            (1, true),
            "a late joiner ramps at once"
        );

        let mut off = Ramp::default();
        off.joined(true);
        assert_eq!(
            off.step(10, true, Duration::ZERO, t0),
            (10, false),
            "no window, no ramp"
        );
    }
}
