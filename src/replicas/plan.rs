//! The seed API's requests, decided before anything is touched: which replicas `POST /add` starts and
//! which `DELETE /rm` removes, or why the request is refused; and how long a failed removal waits
//! before it is tried again. Pure: a refused request changes nothing.

use std::time::Duration;

use crate::config::is_hostname;
use crate::util::Rng;

/// `{"n": 2, "hostnames": ["S5"]}`, as the seed systems' scripts send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScaleRequest {
    pub(crate) n: i64,
    pub(crate) hostnames: Vec<String>,
}

/// Why a request is refused; the text is the `message` of the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ScaleRefusal {
    #[error("n must be a positive number of replicas, not {0}")]
    NotPositive(i64),
    #[error("<Error> Length of hostname list is more than newly added instances")]
    TooManyNamesToAdd,
    #[error("<Error> Length of hostname list is more than removable instances")]
    TooManyNamesToRemove,
    #[error("{0:?} is not a valid hostname (letters, digits and '-', at most 63)")]
    BadHostname(String),
    #[error("hostname {0:?} is given twice")]
    Duplicate(String),
    #[error("a replica named {0:?} exists already")]
    Exists(String),
    #[error("no replica named {0:?}")]
    Unknown(String),
    #[error("replica {0:?} is being replaced: try again once it runs")]
    Busy(String),
    #[error("adding {n} would make {total} replicas, above the maximum of {max} (replicas.max)")]
    AboveMax { n: u64, total: u64, max: u32 },
    #[error("removing {n} would leave {left} replicas, below the minimum of {min} (replicas.min)")]
    BelowMin { n: u64, left: u64, min: u32 },
}

fn check_names(names: &[String]) -> Result<(), ScaleRefusal> {
    for (i, h) in names.iter().enumerate() {
        if !is_hostname(h) {
            return Err(ScaleRefusal::BadHostname(h.clone()));
        }
        if names[..i].iter().any(|o| o.eq_ignore_ascii_case(h)) {
            return Err(ScaleRefusal::Duplicate(h.clone()));
        }
    }
    Ok(())
}

/// The hostnames `POST /add` starts: the named ones, then generated ones up to `n`. `fresh` makes a
/// new generated name (it is asked again until the name is free).
pub(crate) fn plan_add(
    current: &[String],
    req: &ScaleRequest,
    max: u32,
    mut fresh: impl FnMut() -> String,
) -> Result<Vec<String>, ScaleRefusal> {
    if req.n <= 0 {
        return Err(ScaleRefusal::NotPositive(req.n));
    }
    let n = req.n as u64;
    if req.hostnames.len() as u64 > n {
        return Err(ScaleRefusal::TooManyNamesToAdd);
    }
    check_names(&req.hostnames)?;
    if let Some(h) = req
        .hostnames
        .iter()
        .find(|h| current.iter().any(|c| c.eq_ignore_ascii_case(h)))
    {
        return Err(ScaleRefusal::Exists(h.clone()));
    }
    let total = current.len() as u64 + n;
    if total > max as u64 {
        return Err(ScaleRefusal::AboveMax { n, total, max });
    }
    let mut names = req.hostnames.clone();
    while (names.len() as u64) < n {
        let name = fresh();
        let taken = |h: &String| h.eq_ignore_ascii_case(&name);
        if !current.iter().any(taken) && !names.iter().any(taken) {
            names.push(name);
        }
    }
    Ok(names)
}

/// The hostnames `DELETE /rm` removes: the named ones, then others drawn at random up to `n`. Those
/// in `busy` (being replaced) count, but are neither named nor drawn: one operation at a time acts on
/// a replica.
pub(crate) fn plan_remove(
    current: &[String],
    busy: &[String],
    req: &ScaleRequest,
    min: u32,
    rng: &Rng,
) -> Result<Vec<String>, ScaleRefusal> {
    if req.n <= 0 {
        return Err(ScaleRefusal::NotPositive(req.n));
    }
    let n = req.n as u64;
    if req.hostnames.len() as u64 > n {
        return Err(ScaleRefusal::TooManyNamesToRemove);
    }
    check_names(&req.hostnames)?;
    let mut chosen = Vec::new();
    for h in &req.hostnames {
        match current.iter().find(|c| c.eq_ignore_ascii_case(h)) {
            Some(c) if busy.contains(c) => return Err(ScaleRefusal::Busy(c.clone())),
            Some(c) => chosen.push(c.clone()),
            None => return Err(ScaleRefusal::Unknown(h.clone())),
        }
    }
    let left = (current.len() as u64).saturating_sub(n);
    if n > current.len() as u64 || left < min as u64 {
        return Err(ScaleRefusal::BelowMin { n, left, min });
    }
    let mut others: Vec<&String> = current
        .iter()
        .filter(|c| !chosen.contains(c) && !busy.contains(c))
        .collect();
    if (others.len() + chosen.len()) < n as usize {
        let busy = current.iter().find(|c| busy.contains(c)).cloned();
        return Err(ScaleRefusal::Busy(busy.unwrap_or_default()));
    }
    while (chosen.len() as u64) < n {
        let i = rng.below(others.len() as u64) as usize;
        chosen.push(others.swap_remove(i).clone());
    }
    Ok(chosen)
}

/// The first retry of a failed removal comes after this; each further one waits twice as long.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// No retry waits longer than this: an Engine that answers again is used within a minute.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(60);

/// How long a removal that failed `failures` times (at least 1) waits before the next attempt: 1 s,
/// 2 s, 4 s, … up to [`RETRY_CAP`].
pub(crate) fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (RETRY_FIRST * (1u32 << doublings)).min(RETRY_CAP)
}

/// Generated hostnames, in order: `web-1`, `web-2`, … (`plan_add` skips the taken ones).
pub(crate) fn numbered(service: &str) -> impl FnMut() -> String + '_ {
    let mut n = 0u32;
    move || {
        n += 1;
        format!("{service}-{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn req(n: i64, hostnames: &[&str]) -> ScaleRequest {
        ScaleRequest {
            n,
            hostnames: names(hostnames),
        }
    }

    #[test]
    fn add_starts_the_named_ones_then_generated_ones() {
        let current = names(&["web-1", "web-2"]);
        let mut k = 0;
        let got = plan_add(&current, &req(3, &["S5"]), 10, || {
            k += 1;
            // The first generated name is taken: it is asked again.
            if k == 1 {
                "web-1".into()
            } else {
                format!("gen-{k}")
            }
        })
        .unwrap();
        assert_eq!(got, names(&["S5", "gen-2", "gen-3"]));
    }

    #[test]
    fn add_refuses_what_the_seed_systems_refuse() {
        let current = names(&["web-1"]);
        let never = || -> String { unreachable!("a refused request generates nothing") };
        assert_eq!(
            plan_add(&current, &req(1, &["a", "b"]), 10, never)
                .unwrap_err()
                .to_string(),
            "<Error> Length of hostname list is more than newly added instances"
        );
        assert_eq!(
            plan_add(&current, &req(0, &[]), 10, never),
            Err(ScaleRefusal::NotPositive(0))
        );
        assert_eq!(
            plan_add(&current, &req(-2, &[]), 10, never),
            Err(ScaleRefusal::NotPositive(-2))
        );
        assert_eq!(
            plan_add(&current, &req(1, &["WEB-1"]), 10, never),
            Err(ScaleRefusal::Exists("WEB-1".into()))
        );
        assert_eq!(
            plan_add(&current, &req(2, &["x", "x"]), 10, never),
            Err(ScaleRefusal::Duplicate("x".into()))
        );
        assert_eq!(
            plan_add(&current, &req(1, &["no spaces"]), 10, never),
            Err(ScaleRefusal::BadHostname("no spaces".into()))
        );
        let above = plan_add(&current, &req(3, &[]), 3, never).unwrap_err();
        assert_eq!(
            above,
            ScaleRefusal::AboveMax {
                n: 3,
                total: 4,
                max: 3
            }
        );
        assert!(above.to_string().contains("replicas.max"), "{above}");
    }

    #[test]
    fn remove_takes_the_named_ones_then_random_others() {
        let current = names(&["a", "b", "c", "d"]);
        let rng = Rng::seeded(1);
        let got = plan_remove(&current, &[], &req(2, &["c"]), 1, &rng).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], "c");
        assert_ne!(got[1], "c");
        assert!(current.contains(&got[1]));
        // Every replica can be drawn.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(plan_remove(&current, &[], &req(1, &[]), 0, &rng).unwrap()[0].clone());
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn remove_refuses_unknown_names_and_going_below_min() {
        let current = names(&["a", "b", "c"]);
        let rng = Rng::seeded(2);
        assert_eq!(
            plan_remove(&current, &[], &req(1, &["z"]), 0, &rng),
            Err(ScaleRefusal::Unknown("z".into()))
        );
        assert_eq!(
            plan_remove(&current, &[], &req(1, &["a", "b"]), 0, &rng)
                .unwrap_err()
                .to_string(),
            "<Error> Length of hostname list is more than removable instances"
        );
        let below = plan_remove(&current, &[], &req(2, &[]), 2, &rng).unwrap_err();
        assert_eq!(
            below,
            ScaleRefusal::BelowMin {
                n: 2,
                left: 1,
                min: 2
            }
        );
        assert!(below.to_string().contains("replicas.min"), "{below}");
        assert!(matches!(
            plan_remove(&current, &[], &req(4, &[]), 0, &rng),
            Err(ScaleRefusal::BelowMin { .. })
        ));
    }

    #[test]
    fn replicas_being_replaced_are_neither_named_nor_drawn_but_count() {
        let current = names(&["a", "b", "c"]);
        let busy = names(&["b"]);
        let rng = Rng::seeded(3);
        assert_eq!(
            plan_remove(&current, &busy, &req(1, &["b"]), 0, &rng),
            Err(ScaleRefusal::Busy("b".into()))
        );
        for _ in 0..50 {
            let got = plan_remove(&current, &busy, &req(2, &[]), 1, &rng).unwrap();
            assert!(!got.contains(&"b".to_string()), "{got:?}");
        }
        // b counts towards the minimum: removing two of three leaves one (b).
        assert!(plan_remove(&current, &busy, &req(2, &[]), 1, &rng).is_ok());
        // Three cannot be removed while one of them is busy, even with no minimum.
        assert_eq!(
            plan_remove(&current, &busy, &req(3, &[]), 0, &rng),
            Err(ScaleRefusal::Busy("b".into()))
        );
    }

    #[test]
    fn failed_removals_back_off_exponentially_up_to_a_cap() {
        let s = Duration::from_secs;
        let waits: Vec<Duration> = (1..=8).map(retry_after).collect();
        assert_eq!(waits, [s(1), s(2), s(4), s(8), s(16), s(32), s(60), s(60)]);
        assert_eq!(retry_after(0), s(1));
        assert_eq!(retry_after(u32::MAX), RETRY_CAP);
    }

    #[test]
    fn generated_names_fill_the_gaps_in_order() {
        let current = names(&["web-1", "web-3"]);
        let got = plan_add(&current, &req(3, &[]), 10, numbered("web")).unwrap();
        assert_eq!(got, names(&["web-2", "web-4", "web-5"]));
        assert!(got.iter().all(|n| is_hostname(n)));
    }
}
