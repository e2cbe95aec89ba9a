//! Backup tiers: which tier of a pool takes new connections, and when traffic goes back to a better
//! one (`failback`).
//!
//! Every member has a tier (lower first; `backup: true` is tier 1, `priority: N` is N, an SRV
//! record adds its priority). One tier serves at a time: the best one with an eligible backend when
//! the pool starts or when the serving tier has none left (a failover, always at once); a better tier
//! that recovers takes over as `failback` says: `immediate`, `never` (until an operator asks, through
//! the admin API), or `after` it has stayed eligible that long. Active/passive databases need
//! `never`: a primary that returns on its own would split writes across two primaries.
//!
//! The best tier among the members serves all its eligible backends; a worse tier (a backup tier)
//! serves only its first eligible backend (in the config's order), unless `all_backups`, as
//! HAProxy's backup servers and `allbackups` do.
//!
//! The decision ([`Tiers::decide`]) is pure and tested here; the pool makes it each time it builds a
//! snapshot and wakes itself when an `after` wait ends.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Failback;

/// Why the serving tier changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The first tier with an eligible backend.
    Start,
    /// The serving tier has no eligible backend left.
    Failover,
    /// A better tier is eligible again (`failback: immediate`, or during start-up).
    Failback,
    /// A better tier stayed eligible for the `failback.after` wait.
    FailbackAfter(Duration),
    /// An operator asked (`POST /services/{name}/failback`).
    Operator,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Start => f.write_str("the best tier with an eligible backend"),
            Reason::Failover => f.write_str("the serving tier has no eligible backend"),
            Reason::Failback => {
                f.write_str("a better tier is eligible again (failback: immediate)")
            }
            Reason::FailbackAfter(d) => write!(
                f,
                "a better tier stayed eligible for {} (failback: after)",
                crate::config::Dur(*d)
            ),
            Reason::Operator => f.write_str("an operator asked for failback"),
        }
    }
}

impl Reason {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Failover => "failover",
            Reason::Failback => "failback",
            Reason::FailbackAfter(_) => "failback_after",
            Reason::Operator => "operator",
        }
    }
}

/// A change of the serving tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TierChange {
    pub(crate) from: Option<u32>,
    pub(crate) to: u32,
    pub(crate) reason: Reason,
}

/// Which tier serves, and since when a better one has been waiting (`after`).
#[derive(Debug, Default)]
pub(crate) struct Tiers {
    serving: Option<u32>,
    better_since: Option<Instant>,
    /// A better tier is eligible but `failback` holds traffic where it is.
    held: bool,
}

/// What [`Tiers::decide`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The tier that takes new connections (`None` before any tier had an eligible backend).
    pub(crate) serving: Option<u32>,
    pub(crate) change: Option<TierChange>,
    /// When to decide again (an `after` wait ends then).
    pub(crate) wake_at: Option<Instant>,
    /// A better tier became eligible and `failback` keeps traffic where it is (said once).
    pub(crate) held_began: bool,
}

impl Tiers {
    /// Whether a better tier is eligible and `failback` keeps traffic off it.
    pub(crate) fn held(&self) -> bool {
        self.held
    }

    /// Decides the serving tier given the tiers that have an eligible backend (`available`) and
    /// the policy; `starting` (the pool's start-up) fails back at once whatever the policy, since
    /// the order in which first probes answer is no reason to stay on a backup.
    pub(crate) fn decide(
        &mut self,
        available: &BTreeSet<u32>,
        policy: Failback,
        starting: bool,
        now: Instant,
    ) -> Decision {
        let best = available.first().copied();
        let mut decision = Decision {
            serving: self.serving,
            change: None,
            wake_at: None,
            held_began: false,
        };
        let Some(best) = best else {
            // Nothing is eligible: the serving tier stays what it was (it is what recovers first
            // that decides next).
            self.better_since = None;
            self.held = false;
            return decision;
        };
        let reason = match self.serving {
            None => Some(Reason::Start),
            Some(s) if !available.contains(&s) => Some(Reason::Failover),
            Some(s) if best < s => match (policy, starting) {
                (_, true) | (Failback::Immediate, _) => Some(Reason::Failback),
                (Failback::Never, _) => None,
                (Failback::After(d), _) => {
                    let since = *self.better_since.get_or_insert(now);
                    if now.duration_since(since) >= d.0 {
                        Some(Reason::FailbackAfter(d.0))
                    } else {
                        decision.wake_at = Some(since + d.0);
                        None
                    }
                }
            },
            Some(_) => None,
        };
        match reason {
            Some(reason) => {
                decision.change = Some(self.switch(best, reason));
                decision.serving = Some(best);
            }
            None => {
                let was = self.held;
                self.held = self.serving.is_some_and(|s| best < s);
                decision.held_began = self.held && !was;
                if !self.held {
                    self.better_since = None;
                }
            }
        }
        decision
    }

    /// An operator's failback: to the best available tier, if it is better than the serving one.
    pub(crate) fn failback(&mut self, available: &BTreeSet<u32>) -> Option<TierChange> {
        let best = available.first().copied()?;
        match self.serving {
            Some(s) if best < s => Some(self.switch(best, Reason::Operator)),
            _ => None,
        }
    }

    fn switch(&mut self, to: u32, reason: Reason) -> TierChange {
        let from = self.serving.replace(to);
        self.better_since = None;
        self.held = false;
        TierChange { from, to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn tiers(t: &[u32]) -> BTreeSet<u32> {
        t.iter().copied().collect()
    }

    #[test]
    fn start_and_failover_are_immediate_whatever_the_policy() {
        let now = Instant::now();
        for policy in [
            Failback::Immediate,
            Failback::Never,
            Failback::After(Dur::secs(60)),
        ] {
            let mut t = Tiers::default();
            assert_eq!(t.decide(&tiers(&[]), policy, false, now).serving, None);
            let d = t.decide(&tiers(&[0, 1]), policy, false, now);
            assert_eq!(d.serving, Some(0));
            assert_eq!(d.change.unwrap().reason, Reason::Start);
            let d = t.decide(&tiers(&[1]), policy, false, now);
            assert_eq!(
                d.change,
                Some(TierChange {
                    from: Some(0),
                    to: 1,
                    reason: Reason::Failover
                })
            );
            // Nothing eligible at all: the serving tier is kept, nothing changes.
            let d = t.decide(&tiers(&[]), policy, false, now);
            assert_eq!((d.serving, d.change), (Some(1), None));
        }
    }

    #[test]
    fn immediate_fails_back_at_once() {
        let now = Instant::now();
        let mut t = Tiers::default();
        t.decide(&tiers(&[1]), Failback::Immediate, false, now);
        let d = t.decide(&tiers(&[0, 1]), Failback::Immediate, false, now);
        assert_eq!(d.change.unwrap().reason, Reason::Failback);
        assert_eq!(d.serving, Some(0));
    }

    #[test]
    fn never_stays_until_an_operator_asks() {
        let now = Instant::now();
        let mut t = Tiers::default();
        t.decide(&tiers(&[0, 1]), Failback::Never, false, now);
        t.decide(&tiers(&[1]), Failback::Never, false, now);
        for i in 0..10 {
            let d = t.decide(
                &tiers(&[0, 1]),
                Failback::Never,
                false,
                now + Duration::from_secs(i * 3600),
            );
            assert_eq!((d.serving, d.change, d.wake_at), (Some(1), None, None));
            assert_eq!(d.held_began, i == 0, "the hold is said once");
            assert!(t.held());
        }
        assert_eq!(
            t.failback(&tiers(&[0, 1])),
            Some(TierChange {
                from: Some(1),
                to: 0,
                reason: Reason::Operator
            })
        );
        assert!(!t.held());
        assert_eq!(
            t.failback(&tiers(&[0, 1])),
            None,
            "already on the best tier"
        );
        // During start-up the order of first probes decides nothing: back at once.
        let mut t = Tiers::default();
        t.decide(&tiers(&[1]), Failback::Never, true, now);
        assert_eq!(
            t.decide(&tiers(&[0, 1]), Failback::Never, true, now)
                .serving,
            Some(0)
        );
    }

    #[test]
    fn after_waits_for_the_better_tier_to_stay_eligible() {
        let t0 = Instant::now();
        let wait = Failback::After(Dur::secs(300));
        let mut t = Tiers::default();
        t.decide(&tiers(&[1]), wait, false, t0);
        let d = t.decide(&tiers(&[0, 1]), wait, false, t0);
        assert_eq!(
            (d.serving, d.wake_at),
            (Some(1), Some(t0 + Duration::from_secs(300)))
        );
        let d = t.decide(&tiers(&[0, 1]), wait, false, t0 + Duration::from_secs(299));
        assert_eq!(d.change, None);
        // It flaps: the wait starts again.
        t.decide(&tiers(&[1]), wait, false, t0 + Duration::from_secs(299));
        let t1 = t0 + Duration::from_secs(310);
        let d = t.decide(&tiers(&[0, 1]), wait, false, t1);
        assert_eq!(d.wake_at, Some(t1 + Duration::from_secs(300)));
        let d = t.decide(&tiers(&[0, 1]), wait, false, t1 + Duration::from_secs(300));
        assert_eq!(
            d.change,
            Some(TierChange {
                from: Some(1),
                to: 0,
                reason: Reason::FailbackAfter(Duration::from_secs(300))
            })
        );
    }
}
