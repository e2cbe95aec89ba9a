//! The autoscaler's decision, apart from the code that acts on it: from samples of a load metric
//! (open connections, or new connections per second, summed over the replicas) it decides whether to
//! scale up, down, or hold. Pure: the clock comes in as an argument, so tests drive it.
//!
//! The rule, with `target` per replica and the metric averaged over `window`:
//! - up when the mean per replica is above `target`: to `ceil(load / target)` replicas;
//! - down only when even one replica fewer would stay clearly below target (at most `DOWN_RATIO` of
//!   it): to `max(ceil(load / (target × DOWN_RATIO)), …)`, never below the minimum;
//! - within `min..=max`, at most one change per cool-down, and a fresh window after every change.
//!
//! Why a steady load never flaps: after scaling to `r = ceil(load / target)`, `load / r ≤ target`
//! (no further up), and `load / (r − 1) > target > DOWN_RATIO × target` (no down).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How far below target the load must be, with one replica fewer, to scale down.
pub(crate) const DOWN_RATIO: f64 = 0.7;

/// The autoscaler's settings, from `autoscale:`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AutoscalePolicy {
    pub(crate) target: f64,
    pub(crate) min: u32,
    pub(crate) max: u32,
    pub(crate) up_cooldown: Duration,
    pub(crate) down_cooldown: Duration,
    pub(crate) window: Duration,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Decision {
    Hold,
    /// Scale to this many replicas; `per_replica` is the windowed metric that caused it.
    Up {
        to: u32,
        per_replica: f64,
    },
    Down {
        to: u32,
        per_replica: f64,
    },
}

/// Samples of the summed metric and the time of the last change.
#[derive(Debug)]
pub(crate) struct Autoscaler {
    policy: AutoscalePolicy,
    samples: VecDeque<(Instant, f64)>,
    /// Since when the window has been filling (reset by every change).
    since: Instant,
    last_change: Option<Instant>,
}

impl Autoscaler {
    pub(crate) fn new(policy: AutoscalePolicy, now: Instant) -> Autoscaler {
        Autoscaler {
            policy,
            samples: VecDeque::new(),
            since: now,
            last_change: None,
        }
    }

    /// Records the summed metric over all replicas at `now`.
    pub(crate) fn observe(&mut self, now: Instant, total: f64) {
        self.samples.push_back((now, total));
        while let Some(&(t, _)) = self.samples.front() {
            if now.duration_since(t) >= self.policy.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// The metric per replica over the window, once the window has filled.
    pub(crate) fn per_replica(&self, now: Instant, replicas: u32) -> Option<f64> {
        if now.duration_since(self.since) < self.policy.window || self.samples.is_empty() {
            return None;
        }
        let mean = self.samples.iter().map(|(_, v)| v).sum::<f64>() / self.samples.len() as f64;
        Some(mean / replicas.max(1) as f64)
    }

    /// What to do with `replicas` running now.
    pub(crate) fn decide(&self, now: Instant, replicas: u32) -> Decision {
        let p = &self.policy;
        let Some(per) = self.per_replica(now, replicas) else {
            return Decision::Hold;
        };
        let load = per * replicas.max(1) as f64;
        let cooled = |d: Duration| self.last_change.is_none_or(|t| now.duration_since(t) >= d);
        if replicas < p.min {
            return Decision::Up {
                to: p.min,
                per_replica: per,
            };
        }
        if per > p.target && replicas < p.max && cooled(p.up_cooldown) {
            let to = ((load / p.target).ceil() as u32).clamp(replicas + 1, p.max);
            return Decision::Up {
                to,
                per_replica: per,
            };
        }
        if replicas > p.min
            && load / (replicas - 1) as f64 <= p.target * DOWN_RATIO
            && cooled(p.down_cooldown)
        {
            let to = ((load / (p.target * DOWN_RATIO)).ceil() as u32).clamp(p.min, replicas - 1);
            return Decision::Down {
                to,
                per_replica: per,
            };
        }
        Decision::Hold
    }

    /// A change was made at `now`: the cool-downs start, and the next decision waits for a fresh
    /// window measured with the new number of replicas.
    pub(crate) fn changed(&mut self, now: Instant) {
        self.last_change = Some(now);
        self.since = now;
        self.samples.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AutoscalePolicy {
        AutoscalePolicy {
            target: 10.0,
            min: 1,
            max: 8,
            up_cooldown: Duration::from_secs(30),
            down_cooldown: Duration::from_secs(60),
            window: Duration::from_secs(20),
        }
    }

    /// Feeds `total` every second for `secs` seconds from `*t`, then asks.
    fn run(a: &mut Autoscaler, t: &mut Instant, secs: u64, total: f64, replicas: u32) -> Decision {
        for _ in 0..secs {
            *t += Duration::from_secs(1);
            a.observe(*t, total);
        }
        a.decide(*t, replicas)
    }

    /// `/add` and `/rm` call `changed`: an idle service that would be scaled down is held for the
    /// down cool-down after an operator's change, then scaled down.
    #[test]
    fn a_change_holds_the_next_decision_for_its_cool_down() {
        let mut t = Instant::now();
        let mut a = Autoscaler::new(policy(), t);
        assert!(matches!(
            run(&mut a, &mut t, 20, 0.0, 5),
            Decision::Down { to: 1, .. }
        ));
        a.changed(t);
        assert_eq!(run(&mut a, &mut t, 59, 0.0, 5), Decision::Hold);
        assert!(matches!(
            run(&mut a, &mut t, 1, 0.0, 5),
            Decision::Down { to: 1, .. }
        ));
    }

    #[test]
    fn nothing_before_the_window_fills() {
        let mut t = Instant::now();
        let mut a = Autoscaler::new(policy(), t);
        assert_eq!(run(&mut a, &mut t, 10, 500.0, 1), Decision::Hold);
        assert!(matches!(
            run(&mut a, &mut t, 10, 500.0, 1),
            Decision::Up { .. }
        ));
    }

    #[test]
    fn scales_up_to_what_the_load_needs_within_max() {
        let mut t = Instant::now();
        let mut a = Autoscaler::new(policy(), t);
        assert_eq!(
            run(&mut a, &mut t, 20, 35.0, 2),
            Decision::Up {
                to: 4,
                per_replica: 17.5
            }
        );
        let mut b = Autoscaler::new(policy(), t);
        assert!(matches!(
            run(&mut b, &mut t, 20, 1000.0, 2),
            Decision::Up { to: 8, .. }
        ));
        // At max: hold, whatever the load.
        assert_eq!(b.decide(t, 8), Decision::Hold);
    }

    #[test]
    fn a_steady_load_never_flaps() {
        for load in [5.0, 10.0, 11.0, 29.0, 30.0, 31.0, 44.9, 70.0] {
            let mut t = Instant::now();
            let mut a = Autoscaler::new(policy(), t);
            let mut replicas = 1;
            let mut changes = 0;
            for _ in 0..60 {
                match run(&mut a, &mut t, 5, load, replicas) {
                    Decision::Up { to, .. } | Decision::Down { to, .. } => {
                        replicas = to;
                        a.changed(t);
                        changes += 1;
                    }
                    Decision::Hold => {}
                }
            }
            assert!(
                changes <= 1,
                "load {load}: {changes} changes, ends at {replicas}"
            );
            assert!(load / replicas as f64 <= 10.0, "load {load} on {replicas}");
        }
    }

    #[test]
    fn scales_down_only_when_clearly_below_and_after_the_cooldown() {
        let mut t = Instant::now();
        let mut a = Autoscaler::new(policy(), t);
        // 4 replicas, 25 in all: one fewer would be 8.3 each, above 7: hold.
        assert_eq!(run(&mut a, &mut t, 20, 25.0, 4), Decision::Hold);
        // 4 replicas, 14 in all: one fewer is 4.7 each: down to ceil(14 / 7) = 2.
        assert_eq!(
            run(&mut a, &mut t, 20, 14.0, 4),
            Decision::Down {
                to: 2,
                per_replica: 3.5
            }
        );
        a.changed(t);
        // Nothing in the cool-down (60 s), even with no load at all.
        assert_eq!(run(&mut a, &mut t, 40, 0.0, 2), Decision::Hold);
        assert_eq!(
            run(&mut a, &mut t, 20, 0.0, 2),
            Decision::Down {
                to: 1,
                per_replica: 0.0
            }
        );
        // Never below min.
        assert_eq!(a.decide(t, 1), Decision::Hold);
    }

    #[test]
    fn below_min_scales_up_at_once() {
        let mut t = Instant::now();
        let mut a = Autoscaler::new(AutoscalePolicy { min: 2, ..policy() }, t);
        assert!(matches!(
            run(&mut a, &mut t, 20, 0.0, 1),
            Decision::Up { to: 2, .. }
        ));
    }
}
