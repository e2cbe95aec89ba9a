//! Healing, decided apart from the code that acts on it: which replicas to replace (exited, gone, or
//! unhealthy too long), and a budget of replacements per minute so a crash-looping image cannot storm
//! the Docker daemon. Pure: times come in as arguments.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// What is known of one replica at a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) hostname: String,
    /// Docker's state of its container; `None` when the container is gone.
    pub(crate) state: Option<String>,
    /// Docker's words for it.
    pub(crate) status: String,
    /// Since when sluicegate's own health checks find it unhealthy.
    pub(crate) unhealthy_since: Option<Instant>,
}

/// Why a replica is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Its container stopped (`Exited (137) …`).
    Exited(String),
    /// Its container is gone (removed outside sluicegate).
    Gone,
    /// Unhealthy for this long.
    Unhealthy(Duration),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Exited(status) => write!(f, "container stopped: {status}"),
            Reason::Gone => f.write_str("container gone"),
            Reason::Unhealthy(d) => write!(f, "unhealthy for {:.0} s", d.as_secs_f64()),
        }
    }
}

/// The replicas to replace now, and why.
pub(crate) fn to_replace(
    observed: &[Observed],
    now: Instant,
    unhealthy_after: Duration,
) -> Vec<(String, Reason)> {
    observed
        .iter()
        .filter_map(|o| {
            let reason = match o.state.as_deref() {
                None => Reason::Gone,
                // Still coming up, or paused by an operator on purpose: not a failure.
                Some("running" | "created" | "restarting" | "paused") => match o.unhealthy_since {
                    Some(t) if now.duration_since(t) >= unhealthy_after => {
                        Reason::Unhealthy(now.duration_since(t))
                    }
                    _ => return None,
                },
                Some(_) => Reason::Exited(o.status.clone()),
            };
            Some((o.hostname.clone(), reason))
        })
        .collect()
}

/// At most `per_minute` replacements in any minute.
#[derive(Debug)]
pub(crate) struct Budget {
    per_minute: u32,
    used: VecDeque<Instant>,
}

impl Budget {
    pub(crate) fn new(per_minute: u32) -> Budget {
        Budget {
            per_minute: per_minute.max(1),
            used: VecDeque::new(),
        }
    }

    /// Takes one replacement if the last minute has room for it.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        while self
            .used
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.used.pop_front();
        }
        if self.used.len() as u32 >= self.per_minute {
            return false;
        }
        self.used.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(h: &str, state: Option<&str>, unhealthy_since: Option<Instant>) -> Observed {
        Observed {
            hostname: h.into(),
            state: state.map(str::to_string),
            status: "Exited (137) 1 second ago".into(),
            unhealthy_since,
        }
    }

    #[test]
    fn exited_gone_and_long_unhealthy_replicas_are_replaced() {
        let now = Instant::now() + Duration::from_secs(100);
        let after = Duration::from_secs(30);
        let got = to_replace(
            &[
                obs("ok", Some("running"), None),
                obs("dead", Some("exited"), None),
                obs("gone", None, None),
                obs("sick", Some("running"), Some(now - Duration::from_secs(31))),
                obs(
                    "briefly",
                    Some("running"),
                    Some(now - Duration::from_secs(5)),
                ),
                obs("paused", Some("paused"), None),
            ],
            now,
            after,
        );
        let names: Vec<&str> = got.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(names, ["dead", "gone", "sick"]);
        assert!(got[0].1.to_string().contains("Exited (137)"));
        assert_eq!(got[1].1, Reason::Gone);
        assert_eq!(got[2].1, Reason::Unhealthy(Duration::from_secs(31)));
    }

    #[test]
    fn the_budget_bounds_replacements_per_minute() {
        let t0 = Instant::now();
        let mut b = Budget::new(3);
        assert!(b.take(t0) && b.take(t0) && b.take(t0 + Duration::from_secs(10)));
        assert!(!b.take(t0 + Duration::from_secs(20)), "a crash loop waits");
        assert!(!b.take(t0 + Duration::from_secs(59)));
        assert!(
            b.take(t0 + Duration::from_secs(60)),
            "the oldest two expired"
        );
        assert!(b.take(t0 + Duration::from_secs(61)));
        assert!(!b.take(t0 + Duration::from_secs(62)));
    }
}
