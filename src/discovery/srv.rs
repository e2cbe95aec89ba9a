//! SRV records as backends (`backends: [{srv: _db._tcp.service.consul}]`): each record names a target
//! host, a port, a weight and a priority; every address of the target becomes a backend at that
//! port, with the record's weight and its priority as its tier (added to the entry's own). Consul,
//! Kubernetes headless services and Nomad publish them.
//!
//! A target's addresses come from the answer's additional section when the server sent them
//! (Consul does), else from one A/AAAA query per target, all within the query's bound. A target
//! whose lookup fails makes the whole answer a failure (the last good set stays: a partial answer
//! would drop that target's backends); a target with no addresses is left out. A record whose target
//! is `.` says the service is decidedly not offered there (RFC 2782) and is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::TokioResolver;

use super::{addresses, Answer, Claimed};
use crate::config::Weight;

/// At most this many distinct targets are looked up per answer: each costs a query.
pub(crate) const MAX_TARGETS: usize = 64;

/// One SRV record, as the logic below needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) priority: u16,
    pub(crate) weight: u16,
    pub(crate) port: u16,
    /// Lower case, without the trailing dot.
    pub(crate) target: String,
}

/// The backends `records` make, given each target's addresses: one per (address, port), the best
/// tier (lowest) and then the highest weight when two records give the same one. A weight of 0
/// (RFC 2782: "very small chance") becomes the smallest weight, 1.
pub(crate) fn backends(
    records: &[Record],
    addresses: &BTreeMap<String, BTreeSet<IpAddr>>,
    tier: u32,
) -> BTreeSet<Claimed> {
    let mut best: BTreeMap<SocketAddr, Claimed> = BTreeMap::new();
    for r in records {
        let Some(ips) = addresses.get(&r.target) else {
            continue;
        };
        let host: Arc<str> = r.target.as_str().into();
        for ip in ips {
            let c = Claimed {
                addr: SocketAddr::new(*ip, r.port),
                weight: Weight::saturating(u32::from(r.weight)),
                tier: tier.saturating_add(u32::from(r.priority)),
                host: Some(host.clone()),
            };
            let better = |old: &Claimed| {
                (c.tier, std::cmp::Reverse(c.weight)) < (old.tier, std::cmp::Reverse(old.weight))
            };
            match best.get(&c.addr) {
                Some(old) if !better(old) => {}
                _ => {
                    best.insert(c.addr, c);
                }
            }
        }
    }
    best.into_values().collect()
}

/// Asks for the SRV records of `name` and the addresses of their targets; the caller bounds it by
/// `limit` in all.
pub(super) async fn query(
    resolver: &TokioResolver,
    name: &str,
    tier: u32,
    limit: Duration,
) -> Answer {
    let qname = match Name::from_ascii(name) {
        Ok(n) => n,
        Err(e) => return Answer::Failed(format!("{name:?} is not a DNS name: {e}")),
    };
    let lookup = match resolver.srv_lookup(qname).await {
        Ok(l) => l,
        Err(e) if e.is_no_records_found() => return Answer::Empty(e.to_string()),
        Err(e) => return Answer::Failed(e.to_string()),
    };
    let records: Vec<Record> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(Record {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: bare(&srv.target),
            }),
            _ => None,
        })
        .filter(|r| !r.target.is_empty())
        .collect();
    if records.is_empty() {
        return Answer::Empty("no SRV records (or only ones whose target is \".\")".into());
    }
    // The addresses the server volunteered, by owner name.
    let mut known: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for r in lookup.additionals() {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        known.entry(bare(&r.name)).or_default().insert(ip);
    }
    let targets: BTreeSet<&str> = records.iter().map(|r| r.target.as_str()).collect();
    if targets.len() > MAX_TARGETS {
        return Answer::Failed(format!(
            "{} distinct SRV targets, more than the {MAX_TARGETS} looked up per answer",
            targets.len()
        ));
    }
    let missing: Vec<&str> = targets
        .into_iter()
        .filter(|t| !known.contains_key(*t))
        .collect();
    let found = futures_util::future::join_all(
        missing
            .iter()
            .map(|t| async move { (*t, addresses(resolver, t, limit).await) }),
    )
    .await;
    for (target, result) in found {
        match result {
            Ok(ips) => {
                known.insert(target.to_string(), ips);
            }
            // No address: that target is left out.
            Err(Answer::Empty(_)) => {}
            Err(Answer::Failed(why)) => {
                return Answer::Failed(format!("target {target}: {why}"));
            }
            Err(Answer::Records(_)) => {}
        }
    }
    let set = backends(&records, &known, tier);
    if set.is_empty() {
        Answer::Empty("no SRV target has an address".into())
    } else {
        Answer::Records(set)
    }
}

/// A name in lower case without its trailing dot (`.` becomes empty).
fn bare(n: &Name) -> String {
    n.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(priority: u16, weight: u16, port: u16, target: &str) -> Record {
        Record {
            priority,
            weight,
            port,
            target: target.into(),
        }
    }

    #[test]
    fn records_become_backends_with_their_weight_and_tier() {
        let ips = |s: &[&str]| {
            s.iter()
                .map(|i| i.parse().unwrap())
                .collect::<BTreeSet<IpAddr>>()
        };
        let mut addrs = BTreeMap::new();
        addrs.insert("a.node".to_string(), ips(&["10.0.0.1", "10.0.0.2"]));
        addrs.insert("b.node".to_string(), ips(&["10.0.0.3"]));
        let records = [
            rec(0, 5, 5432, "a.node"),
            rec(10, 0, 5433, "b.node"),
            // The same address and port at a worse priority: the better one wins.
            rec(20, 9, 5432, "a.node"),
            // A target without addresses is left out.
            rec(0, 1, 1, "gone.node"),
        ];
        let got: Vec<(String, u32, u32)> = backends(&records, &addrs, 1)
            .into_iter()
            .map(|c| (c.addr.to_string(), c.weight.get(), c.tier))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:5432".to_string(), 5, 1),
                ("10.0.0.2:5432".to_string(), 5, 1),
                ("10.0.0.3:5433".to_string(), 1, 11),
            ]
        );
    }
}
