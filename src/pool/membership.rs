//! Who should be a member: every source (the static config, each DNS name, the admin API) claims a set
//! of addresses with weights and tiers; the admin API may also exclude an address or override its
//! weight. The members are the union of the claims minus the exclusions, each with the highest weight
//! and the best (lowest) tier any source gives it, unless the API set its weight.
//!
//! Pure: no timers, no I/O, no backends. [`Membership::desired`] and [`diff`] compute what should
//! change; the pool (`pool/mod.rs`) applies it to the live backends.

use crate::config::Weight;
use crate::discovery::{Claimed, Finder};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

/// Where a backend came from. A backend claimed by several sources stays while any claims it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Static,
    /// A DNS name with its port, as written in the config (`backend:5000`).
    Dns(Arc<str>),
    /// A name's SRV records (`_db._tcp.service.consul`).
    Srv(Arc<str>),
    Api,
    /// Containers sluicegate runs itself (`replicas:`).
    Docker,
    /// Docker containers carrying some labels (`docker: {labels}`), by their `k=v,...`.
    Labels(Arc<str>),
}

impl From<&Finder> for Source {
    fn from(f: &Finder) -> Source {
        match f {
            Finder::Name(label) => Source::Dns(label.clone()),
            Finder::Srv(name) => Source::Srv(name.clone()),
            Finder::Labels(labels) => Source::Labels(labels.clone()),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Static => f.write_str("static"),
            Source::Dns(name) => write!(f, "dns:{name}"),
            Source::Srv(name) => write!(f, "srv:{name}"),
            Source::Api => f.write_str("api"),
            Source::Docker => f.write_str("docker"),
            Source::Labels(labels) => write!(f, "docker:{labels}"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What one address should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Desired {
    pub(crate) weight: Weight,
    /// Its tier: the best (lowest) any source gives it.
    pub(crate) tier: u32,
    /// Its place among the claims (sources in order, each claim in its order): a backup tier that
    /// serves one backend at a time serves the first.
    pub(crate) rank: u32,
    /// The DNS name it was found under, the first a source gives.
    pub(crate) host: Option<Arc<str>>,
    /// Every source that claims it, in source order.
    pub(crate) sources: Vec<Source>,
}

/// The claims of every source and the admin API's exclusions and weight overrides.
#[derive(Debug, Default)]
pub(super) struct Membership {
    claims: BTreeMap<Source, Vec<Claimed>>,
    /// Addresses removed through the admin API: no source brings them back until re-added there.
    excluded: HashSet<SocketAddr>,
    /// Weights set through the admin API, over what the sources say.
    weight_overrides: HashMap<SocketAddr, Weight>,
}

impl Membership {
    /// Replaces what `source` claims (an empty set withdraws the claim).
    pub(super) fn claim(&mut self, source: Source, desired: Vec<impl Into<Claimed>>) {
        if desired.is_empty() {
            self.claims.remove(&source);
        } else {
            self.claims
                .insert(source, desired.into_iter().map(Into::into).collect());
        }
    }

    /// The admin API adds `addr`: it lifts an earlier API removal and weight override.
    pub(super) fn add_api(&mut self, addr: SocketAddr, weight: Weight) {
        self.excluded.remove(&addr);
        self.weight_overrides.remove(&addr);
        let claim = self.claims.entry(Source::Api).or_default();
        claim.retain(|c| c.addr != addr);
        claim.push(Claimed::new(addr, weight));
    }

    /// The admin API removes `addr` whatever its sources, until it adds it again.
    pub(super) fn remove_api(&mut self, addr: SocketAddr) {
        self.excluded.insert(addr);
        if let Some(claim) = self.claims.get_mut(&Source::Api) {
            claim.retain(|c| c.addr != addr);
            if claim.is_empty() {
                self.claims.remove(&Source::Api);
            }
        }
    }

    /// How many addresses the admin API claims.
    pub(super) fn api_claims(&self) -> usize {
        self.claims.get(&Source::Api).map_or(0, Vec::len)
    }

    /// The admin API sets `addr`'s weight over what its sources say.
    pub(super) fn override_weight(&mut self, addr: SocketAddr, weight: Weight) {
        self.weight_overrides.insert(addr, weight);
    }

    /// The members there should be, by address.
    pub(super) fn desired(&self) -> BTreeMap<SocketAddr, Desired> {
        let mut union: BTreeMap<SocketAddr, Desired> = BTreeMap::new();
        let mut rank = 0u32;
        for (src, set) in &self.claims {
            for c in set {
                if self.excluded.contains(&c.addr) {
                    continue;
                }
                rank += 1;
                let d = union.entry(c.addr).or_insert(Desired {
                    weight: c.weight,
                    tier: c.tier,
                    rank,
                    host: c.host.clone(),
                    sources: Vec::new(),
                });
                d.weight = d.weight.max(c.weight);
                d.tier = d.tier.min(c.tier);
                if d.host.is_none() {
                    d.host = c.host.clone();
                }
                if !d.sources.contains(src) {
                    d.sources.push(src.clone());
                }
            }
        }
        for (addr, d) in union.iter_mut() {
            if let Some(&w) = self.weight_overrides.get(addr) {
                d.weight = w;
            }
        }
        union
    }
}

/// How the members must change to become the desired set.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Diff {
    /// Not a member yet.
    pub(super) added: Vec<(SocketAddr, Desired)>,
    /// Members no source claims any more.
    pub(super) removed: Vec<SocketAddr>,
    /// Members that stay, with their (possibly new) weight and sources.
    pub(super) kept: Vec<(SocketAddr, Desired)>,
}

/// The difference between the current `members` and `desired`.
pub(super) fn diff(members: &[SocketAddr], mut desired: BTreeMap<SocketAddr, Desired>) -> Diff {
    let mut d = Diff::default();
    for &m in members {
        match desired.remove(&m) {
            Some(want) => d.kept.push((m, want)),
            None => d.removed.push(m),
        }
    }
    d.added = desired.into_iter().collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn w(n: u32) -> Weight {
        Weight::new(n).unwrap()
    }

    fn dns() -> Source {
        Source::Dns("backend:80".into())
    }

    #[test]
    fn the_union_keeps_the_highest_weight_and_every_source() {
        let mut m = Membership::default();
        m.claim(Source::Static, vec![(a(1), w(1)), (a(2), w(5))]);
        m.claim(dns(), vec![(a(2), w(2)), (a(3), w(1))]);
        let d = m.desired();
        assert_eq!(d.len(), 3);
        assert_eq!(d[&a(2)].weight, w(5));
        assert_eq!(d[&a(2)].sources, vec![Source::Static, dns()]);
        assert_eq!(d[&a(3)].sources, vec![dns()]);
    }

    #[test]
    fn the_union_keeps_the_best_tier_the_first_name_and_the_claim_order() {
        let mut m = Membership::default();
        let named = |i, tier, host: &str| Claimed {
            host: Some(host.into()),
            ..Claimed::new(a(i), w(1)).in_tier(tier)
        };
        m.claim(
            Source::Static,
            vec![
                Claimed::new(a(3), w(1)).in_tier(1),
                Claimed::new(a(1), w(1)).in_tier(1),
            ],
        );
        m.claim(dns(), vec![named(1, 0, "db"), named(2, 2, "db")]);
        let d = m.desired();
        assert_eq!((d[&a(1)].tier, d[&a(2)].tier, d[&a(3)].tier), (0, 2, 1));
        assert_eq!(d[&a(1)].host.as_deref(), Some("db"));
        // The static claim's order first (a(3) before a(1)), then the name's.
        assert!(d[&a(3)].rank < d[&a(1)].rank && d[&a(1)].rank < d[&a(2)].rank);
    }

    #[test]
    fn an_empty_claim_withdraws_only_that_source() {
        let mut m = Membership::default();
        m.claim(Source::Static, vec![(a(1), w(1))]);
        m.claim(dns(), vec![(a(1), w(1)), (a(2), w(1))]);
        m.claim(dns(), Vec::<Claimed>::new());
        assert_eq!(m.desired().keys().copied().collect::<Vec<_>>(), [a(1)]);
    }

    #[test]
    fn an_api_removal_outlasts_the_sources_until_the_api_adds_it_back() {
        let mut m = Membership::default();
        m.claim(dns(), vec![(a(1), w(1)), (a(2), w(1))]);
        m.remove_api(a(1));
        m.claim(dns(), vec![(a(1), w(1)), (a(2), w(1))]); // a refresh lists it again
        assert!(!m.desired().contains_key(&a(1)));
        m.add_api(a(1), w(3));
        let d = m.desired();
        assert_eq!(d[&a(1)].weight, w(3));
        assert_eq!(d[&a(1)].sources, vec![dns(), Source::Api]);
    }

    #[test]
    fn a_weight_override_beats_every_source_until_re_added() {
        let mut m = Membership::default();
        m.claim(Source::Static, vec![(a(1), w(7))]);
        m.override_weight(a(1), w(2));
        assert_eq!(m.desired()[&a(1)].weight, w(2));
        m.claim(Source::Static, vec![(a(1), w(9))]);
        assert_eq!(m.desired()[&a(1)].weight, w(2));
        m.add_api(a(1), w(4));
        assert_eq!(
            m.desired()[&a(1)].weight,
            w(9),
            "the highest claim wins again"
        );
    }

    #[test]
    fn diff_sorts_members_into_added_removed_and_kept() {
        let mut m = Membership::default();
        m.claim(Source::Static, vec![(a(2), w(1)), (a(3), w(2))]);
        let d = diff(&[a(1), a(2)], m.desired());
        assert_eq!(d.removed, vec![a(1)]);
        assert_eq!(d.kept.iter().map(|k| k.0).collect::<Vec<_>>(), [a(2)]);
        assert_eq!(d.added.len(), 1);
        assert_eq!(d.added[0].0, a(3));
        assert_eq!(d.added[0].1.weight, w(2));
        assert_eq!(diff(&[a(2), a(3)], m.desired()).added, Vec::new());
    }
}
