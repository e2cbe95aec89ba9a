//! The runtime deny list (`GET/POST/DELETE /deny`, the top-level `limits.deny`, timed bans) and
//! the ban decision ([`Breaches`]): who is refused at accept, before a byte is read.
//!
//! The list is the process's: it lives on the [`super::Gate`], outside the reloaded config, so a
//! reload keeps what the API and the bans put there (only the `config` entries are replaced), and
//! an upgrade carries those entries over ([`DenyList::carried`], [`DenyList::carry_in`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{ip_v4_mapped, BanConfig, Cidr, DEFAULT_MAX_DENIED};
use crate::metrics::{Family, Kind, Samples, Subject, Table};

/// What put an entry on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DenySource {
    /// The top-level `limits.deny`: replaced by each reload, never removed by the API.
    Config,
    /// A timed ban (`limits.ban`).
    Ban,
    /// `POST /deny`.
    Api,
}

/// One entry, as `GET /deny` shows it and an upgrade carries it (the wire's JSON: a field added
/// later must have a default, so that entries from an older process still read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Denied {
    pub(crate) cidr: String,
    /// When it stops refusing, in ms since the Unix epoch; none: until removed.
    pub(crate) expires_ms: Option<u64>,
    pub(crate) source: DenySource,
    pub(crate) reason: String,
}

impl Denied {
    /// As `GET /deny` lists it: `expires` in RFC 3339.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cidr": self.cidr,
            "expires": self.expires_ms.map(|ms| crate::util::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))),
            "source": self.source,
            "reason": self.reason,
        })
    }
}

#[derive(Debug, Clone)]
struct Entry {
    source: DenySource,
    /// Shared: a listing copies entries under the lock, and that copy must be cheap.
    reason: Arc<str>,
    /// When it stops refusing: the monotonic time checked at accept, and the wall-clock time shown
    /// and carried (an upgrade's new process has a clock of its own).
    expires: Option<(Instant, SystemTime)>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|(at, _)| now >= at)
    }
}

/// Why an entry was not put on the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DenyError {
    #[error("the deny list is full ({0} entries, limits.max_denied): remove some, or raise it")]
    Full(usize),
    #[error("{0} is on the deny list from the config (limits.deny): remove it there and reload")]
    FromConfig(String),
    #[error("{0} is not on the deny list")]
    NotFound(String),
}

/// The entries by prefix: one map per (family, prefix length) in use, so a lookup is one hash
/// probe per length in use (at most 33 + 129), whatever the number of entries.
#[derive(Debug, Default)]
struct Entries {
    by_len: BTreeMap<(bool, u8), HashMap<IpAddr, Entry>>,
    len: usize,
    bans: usize,
    /// The soonest expiry of any entry (perhaps one gone since): until then a prune has nothing
    /// to drop, so `/metrics` and a full list do not walk every entry under the lock each time.
    next_expiry: Option<Instant>,
}

impl Entries {
    fn get(&self, net: &IpNet) -> Option<&Entry> {
        self.by_len.get(&key_of(net))?.get(&net.addr())
    }

    fn insert(&mut self, net: IpNet, e: Entry) {
        let bans = e.source == DenySource::Ban;
        if let Some((at, _)) = e.expires {
            self.next_expiry = Some(self.next_expiry.map_or(at, |n| n.min(at)));
        }
        let old = self
            .by_len
            .entry(key_of(&net))
            .or_default()
            .insert(net.addr(), e);
        if let Some(old) = &old {
            self.len -= 1;
            self.bans -= usize::from(old.source == DenySource::Ban);
        }
        self.len += 1;
        self.bans += usize::from(bans);
    }

    fn remove(&mut self, net: &IpNet) -> Option<Entry> {
        let k = key_of(net);
        let map = self.by_len.get_mut(&k)?;
        let e = map.remove(&net.addr())?;
        if map.is_empty() {
            self.by_len.remove(&k);
        }
        self.len -= 1;
        self.bans -= usize::from(e.source == DenySource::Ban);
        Some(e)
    }

    /// The entries whose nets hold `ip`, shortest prefix first (expired ones too: the caller
    /// checks).
    fn matching(&self, ip: IpAddr) -> impl Iterator<Item = (IpNet, &Entry)> {
        let v6 = ip.is_ipv6();
        self.by_len
            .iter()
            .filter(move |((family, _), _)| *family == v6)
            .filter_map(move |(&(_, len), map)| {
                // Valid by construction: `len` came from an IpNet of this family.
                let net = IpNet::new(ip, len).ok()?.trunc();
                map.get(&net.addr()).map(|e| (net, e))
            })
    }

    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let (mut len, mut bans, mut next) = (0, 0, None::<Instant>);
        for map in self.by_len.values_mut() {
            map.retain(|_, e| keep(e));
            len += map.len();
            for e in map.values() {
                bans += usize::from(e.source == DenySource::Ban);
                if let Some((at, _)) = e.expires {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        self.by_len.retain(|_, m| !m.is_empty());
        (self.len, self.bans, self.next_expiry) = (len, bans, next);
    }

    /// Drops the expired entries, walking them only once one has expired.
    fn prune(&mut self, now: Instant) {
        if self.next_expiry.is_some_and(|at| at <= now) {
            self.retain(|e| !e.expired(now));
        }
    }
}

fn key_of(net: &IpNet) -> (bool, u8) {
    (matches!(net, IpNet::V6(_)), net.prefix_len())
}

/// The process's deny list: bounded (`limits.max_denied`), looked up at every accept.
#[derive(Debug)]
pub(crate) struct DenyList {
    entries: RwLock<Entries>,
    /// Entries now (expired ones until a look finds them): with none, an accept takes no lock.
    len: AtomicUsize,
    max: AtomicUsize,
    bans: AtomicU64,
    bans_unrecorded: AtomicU64,
}

impl Default for DenyList {
    fn default() -> DenyList {
        DenyList {
            entries: RwLock::default(),
            len: AtomicUsize::new(0),
            max: AtomicUsize::new(DEFAULT_MAX_DENIED as usize),
            bans: AtomicU64::new(0),
            bans_unrecorded: AtomicU64::new(0),
        }
    }
}

/// The net a client address or an API's CIDR names: IPv4 seen through a dual-stack socket as IPv4.
fn plain(net: IpNet) -> IpNet {
    match ip_v4_mapped(net.addr()) {
        Some(v4) if net.prefix_len() >= 96 => {
            IpNet::new(v4, net.prefix_len() - 96).map_or(net, |n| n.trunc())
        }
        _ => net.trunc(),
    }
}

impl DenyList {
    /// Whether `ip` is refused now: a read lock, so accepts on every thread look at once. The
    /// expired entries a look finds are removed then, under the write lock.
    pub(crate) fn refuses(&self, ip: IpAddr, now: Instant) -> bool {
        if self.len.load(Relaxed) == 0 {
            return false;
        }
        let ip = ip_v4_mapped(ip).unwrap_or(ip);
        let mut expired = Vec::new();
        for (net, e) in read(&self.entries).matching(ip) {
            if !e.expired(now) {
                return true;
            }
            expired.push(net);
        }
        if !expired.is_empty() {
            let mut entries = write(&self.entries);
            for net in &expired {
                // Put again since the read, perhaps: removed only if still expired.
                if entries.get(net).is_some_and(|e| e.expired(now)) {
                    entries.remove(net);
                }
            }
            self.len.store(entries.len, Relaxed);
        }
        false
    }

    /// A reload's (or the start's) `limits.max_denied` and top-level `limits.deny`: the `config`
    /// entries are replaced; the others stay, even above a lowered bound.
    pub(crate) fn configure(&self, max: usize, deny: &[Cidr]) {
        self.max.store(max, Relaxed);
        let mut entries = write(&self.entries);
        entries.retain(|e| e.source != DenySource::Config);
        for c in deny {
            let e = Entry {
                source: DenySource::Config,
                reason: Arc::from("limits.deny"),
                expires: None,
            };
            entries.insert(plain(c.0), e);
        }
        self.len.store(entries.len, Relaxed);
    }

    /// Puts `net` on the list (`POST /deny`), replacing an API or ban entry for the same net.
    pub(crate) fn add(
        &self,
        net: IpNet,
        ttl: Option<Duration>,
        reason: String,
        now: Instant,
    ) -> Result<Denied, DenyError> {
        self.put(net, DenySource::Api, ttl, reason, now)
    }

    fn put(
        &self,
        net: IpNet,
        source: DenySource,
        ttl: Option<Duration>,
        reason: String,
        now: Instant,
    ) -> Result<Denied, DenyError> {
        let net = plain(net);
        let mut entries = write(&self.entries);
        match entries.get(&net) {
            Some(e) if e.source == DenySource::Config => {
                return Err(DenyError::FromConfig(net.to_string()))
            }
            Some(_) => {}
            None => {
                let max = self.max.load(Relaxed);
                if entries.len >= max {
                    entries.prune(now);
                }
                if entries.len >= max {
                    self.len.store(entries.len, Relaxed);
                    return Err(DenyError::Full(max));
                }
            }
        }
        let expires = ttl.map(|t| (now + t, SystemTime::now() + t));
        let e = Entry {
            source,
            reason: reason.into(),
            expires,
        };
        let shown = denied(&net, &e);
        entries.insert(net, e);
        self.len.store(entries.len, Relaxed);
        Ok(shown)
    }

    /// Bans `ip`'s source (its address; an IPv6 one by /64) for `for_`: a ban counted, or, with the
    /// list full, counted as not recorded. Returns the entry made.
    pub(crate) fn ban(
        &self,
        net: IpNet,
        for_: Duration,
        reason: String,
        now: Instant,
    ) -> Result<Denied, DenyError> {
        let made = self.put(net, DenySource::Ban, Some(for_), reason, now);
        match &made {
            Ok(_) => self.bans.fetch_add(1, Relaxed),
            Err(_) => self.bans_unrecorded.fetch_add(1, Relaxed),
        };
        made
    }

    /// `DELETE /deny/{cidr}`: an API or ban entry; a config entry stays (the config says it).
    pub(crate) fn remove(&self, net: IpNet, now: Instant) -> Result<(), DenyError> {
        let net = plain(net);
        let mut entries = write(&self.entries);
        let found = match entries.get(&net) {
            None => false,
            Some(e) if e.source == DenySource::Config => {
                return Err(DenyError::FromConfig(net.to_string()))
            }
            Some(e) => !e.expired(now),
        };
        entries.remove(&net);
        self.len.store(entries.len, Relaxed);
        if found {
            Ok(())
        } else {
            Err(DenyError::NotFound(net.to_string()))
        }
    }

    /// Every entry in force, by prefix (expired ones are dropped here).
    pub(crate) fn list(&self, now: Instant) -> Vec<Denied> {
        // Copied out under the lock (accepts wait for it), formatted and sorted after.
        let copied: Vec<(IpAddr, u8, Entry)> = {
            let mut entries = write(&self.entries);
            entries.prune(now);
            self.len.store(entries.len, Relaxed);
            entries
                .by_len
                .iter()
                .flat_map(|(&(_, len), m)| m.iter().map(move |(a, e)| (*a, len, e.clone())))
                .collect()
        };
        let mut all: Vec<Denied> = copied
            .iter()
            .filter_map(|(addr, len, e)| IpNet::new(*addr, *len).ok().map(|n| denied(&n, e)))
            .collect();
        all.sort_by(|a, b| a.cidr.cmp(&b.cidr));
        all
    }

    /// What an upgrade carries: the API's entries and the bans (the new process reads the config's
    /// itself), with their wall-clock expiry.
    pub(crate) fn carried(&self, now: Instant) -> Vec<Denied> {
        let mut all = self.list(now);
        all.retain(|d| d.source != DenySource::Config);
        all
    }

    /// Entries an upgrade carried in: each with the time it had left (by the wall clock), above
    /// the bound if need be (the old process held them). Returns how many were taken.
    pub(crate) fn carry_in(&self, carried: &[Denied], now: Instant) -> usize {
        let wall = SystemTime::now();
        let mut entries = write(&self.entries);
        let mut taken = 0;
        for d in carried {
            let Ok(c) = d.cidr.parse::<Cidr>() else {
                continue;
            };
            let expires = match d.expires_ms {
                None => None,
                Some(ms) => {
                    let at = UNIX_EPOCH + Duration::from_millis(ms);
                    match at.duration_since(wall) {
                        Ok(left) => Some((now + left, at)),
                        // Expired on the way.
                        Err(_) => continue,
                    }
                }
            };
            let net = plain(c.0);
            if entries
                .get(&net)
                .is_some_and(|e| e.source == DenySource::Config)
            {
                continue;
            }
            let e = Entry {
                source: d.source,
                reason: d.reason.as_str().into(),
                expires,
            };
            entries.insert(net, e);
            taken += 1;
        }
        self.len.store(entries.len, Relaxed);
        taken
    }

    /// The numbers `/metrics` shows (expired entries dropped first).
    pub(crate) fn view(&self, now: Instant) -> DenyView {
        let mut entries = write(&self.entries);
        entries.prune(now);
        self.len.store(entries.len, Relaxed);
        DenyView {
            entries: entries.len as u64,
            banned: entries.bans as u64,
            bans: self.bans.load(Relaxed),
            bans_unrecorded: self.bans_unrecorded.load(Relaxed),
        }
    }
}

/// The lock's guards; a panic elsewhere while one was held leaves whole entries (each change is one
/// map operation), so a poisoned lock is taken as it is.
fn read(l: &RwLock<Entries>) -> RwLockReadGuard<'_, Entries> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write(l: &RwLock<Entries>) -> RwLockWriteGuard<'_, Entries> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn denied(net: &IpNet, e: &Entry) -> Denied {
    Denied {
        cidr: net.to_string(),
        expires_ms: e.expires.map(|(_, at)| {
            at.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        }),
        source: e.source,
        reason: e.reason.to_string(),
    }
}

/// The deny list's numbers, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DenyView {
    entries: u64,
    banned: u64,
    bans: u64,
    bans_unrecorded: u64,
}

impl Subject for DenyView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

/// The deny list's families, declared here, where the numbers live.
pub(crate) static METRICS: Table<DenyView> = Table {
    subject: &[],
    families: &[
        Family::new(
            Kind::Counter,
            "sluicegate_bans_total",
            "Sources banned by limits.ban (each ban once).",
            &[],
            |v, s| s.put(&[], v.bans),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_bans_unrecorded_total",
            "Bans not put on the deny list because it was full (limits.max_denied).",
            &[],
            |v, s| s.put(&[], v.bans_unrecorded),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_banned_sources",
            "Sources banned now (deny list entries with source ban).",
            &[],
            |v, s| s.put(&[], v.banned),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_denied_entries",
            "Entries on the runtime deny list now (config, ban and api).",
            &[],
            |v, s: &mut Samples<'_>| s.put(&[], v.entries),
        ),
    ],
};

/// Breaches per source within one service's `limits.ban` window: the ban decision, pure (the
/// caller passes the time and acts on the answer).
///
/// Bounded: at most [`Breaches::MAX_SOURCES`] sources. When full, the sources whose last breach
/// left the window are forgotten first; if none has, a new source is not tracked (it is still
/// refused by the limit it broke, and is tracked once there is room).
#[derive(Debug, Default)]
pub(crate) struct Breaches {
    /// Each source's breach times within the window, oldest first (at most `after` of them).
    by_source: HashMap<IpAddr, VecDeque<Instant>>,
}

/// What one breach decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breach {
    /// Counted; not yet `after` within the window.
    Counted,
    /// The `after`-th within the window: ban it (its count starts again).
    Ban,
    /// The table is full of sources still in their window: not tracked.
    Untracked,
}

impl Breaches {
    pub(crate) const MAX_SOURCES: usize = 10_000;

    /// One refusal of `key` by a per-source limit, at `now`, under `rule`.
    pub(crate) fn breach(&mut self, key: IpAddr, rule: &BanConfig, now: Instant) -> Breach {
        let within = rule.within.0;
        let in_window = |t: &Instant| now.saturating_duration_since(*t) < within;
        if !self.by_source.contains_key(&key) && self.by_source.len() >= Self::MAX_SOURCES {
            self.by_source
                .retain(|_, q| q.back().is_some_and(in_window));
            if self.by_source.len() >= Self::MAX_SOURCES {
                return Breach::Untracked;
            }
        }
        let q = self.by_source.entry(key).or_default();
        while q.front().is_some_and(|t| !in_window(t)) {
            q.pop_front();
        }
        q.push_back(now);
        if q.len() >= rule.after as usize {
            self.by_source.remove(&key);
            return Breach::Ban;
        }
        Breach::Counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn net(s: &str) -> IpNet {
        s.parse::<Cidr>().unwrap().0
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(after: u32, within: u64, for_: u64) -> BanConfig {
        BanConfig {
            after,
            within: Dur::secs(within),
            for_: Dur::secs(for_),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bans_after_the_breaches_within_the_window_only() {
        let mut b = Breaches::default();
        let r = rule(3, 60, 600);
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        assert_eq!(b.breach(a, &r, t0), Breach::Counted);
        assert_eq!(b.breach(a, &r, t0), Breach::Counted);
        tokio::time::advance(Duration::from_secs(61)).await;
        // The first two left the window.
        assert_eq!(b.breach(a, &r, Instant::now()), Breach::Counted);
        assert_eq!(b.breach(a, &r, Instant::now()), Breach::Counted);
        assert_eq!(
            b.breach(ip("192.0.2.2"), &r, Instant::now()),
            Breach::Counted
        );
        assert_eq!(b.breach(a, &r, Instant::now()), Breach::Ban);
        assert_eq!(b.by_source.len(), 1, "a banned source starts again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_breach_table_forgets_the_quiet_then_refuses_to_track() {
        let mut b = Breaches::default();
        let r = rule(5, 10, 600);
        let now = Instant::now();
        for i in 0..Breaches::MAX_SOURCES as u32 {
            b.breach(IpAddr::from(std::net::Ipv4Addr::from(i)), &r, now);
        }
        assert_eq!(b.breach(ip("192.0.2.1"), &r, now), Breach::Untracked);
        assert_eq!(b.by_source.len(), Breaches::MAX_SOURCES);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            b.breach(ip("192.0.2.1"), &r, Instant::now()),
            Breach::Counted
        );
        assert_eq!(b.by_source.len(), 1, "the quiet ones were forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_refuse_by_prefix_until_they_expire() {
        let d = DenyList::default();
        let now = Instant::now();
        assert!(!d.refuses(ip("203.0.113.9"), now));
        d.add(
            net("203.0.113.0/24"),
            Some(Duration::from_secs(60)),
            "x".into(),
            now,
        )
        .unwrap();
        d.add(net("2001:db8::/32"), None, "y".into(), now).unwrap();
        assert!(d.refuses(ip("203.0.113.9"), now));
        assert!(
            d.refuses(ip("::ffff:203.0.113.9"), now),
            "through a dual-stack socket"
        );
        assert!(d.refuses(ip("2001:db8:1::1"), now));
        assert!(!d.refuses(ip("203.0.114.1"), now));
        let listed = d.list(now);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].cidr, "203.0.113.0/24");
        assert!(listed[1].expires_ms.is_some() && listed[0].expires_ms.is_none());
        tokio::time::advance(Duration::from_secs(60)).await;
        let later = Instant::now();
        assert!(!d.refuses(ip("203.0.113.9"), later), "expired");
        assert_eq!(d.list(later).len(), 1);
        // An expired /16 above a live /24: the /24 still refuses, and the /16 is gone.
        d.add(
            net("198.51.0.0/16"),
            Some(Duration::from_secs(1)),
            String::new(),
            later,
        )
        .unwrap();
        d.add(net("198.51.100.0/24"), None, String::new(), later)
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let later = Instant::now();
        assert!(d.refuses(ip("198.51.100.1"), later));
        assert!(!d.refuses(ip("198.51.7.1"), later));
        assert_eq!(d.view(later).entries, 2, "2001:db8::/32 and the /24");
        d.remove(net("198.51.100.0/24"), later).unwrap();
        d.remove(net("2001:db8::/32"), later).unwrap();
        assert!(!d.refuses(ip("2001:db8:1::1"), later));
        assert_eq!(
            d.remove(net("2001:db8::/32"), later),
            Err(DenyError::NotFound("2001:db8::/32".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_list_is_bounded_and_bans_beyond_it_are_counted() {
        let d = DenyList::default();
        d.configure(2, &[Cidr(net("10.0.0.0/8"))]);
        let now = Instant::now();
        d.add(net("192.0.2.1"), None, String::new(), now).unwrap();
        assert_eq!(
            d.add(net("192.0.2.2"), None, String::new(), now),
            Err(DenyError::Full(2))
        );
        assert!(d
            .ban(net("192.0.2.3"), Duration::from_secs(5), String::new(), now)
            .is_err());
        // Replacing an entry needs no room.
        d.add(
            net("192.0.2.1"),
            Some(Duration::from_secs(1)),
            String::new(),
            now,
        )
        .unwrap();
        let v = d.view(now);
        assert_eq!((v.entries, v.bans, v.bans_unrecorded), (2, 0, 1));
        assert!(matches!(
            d.remove(net("10.0.0.0/8"), now),
            Err(DenyError::FromConfig(_))
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        let d2 = d
            .ban(
                net("192.0.2.3"),
                Duration::from_secs(5),
                "b".into(),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(d2.source, DenySource::Ban);
        let v = d.view(Instant::now());
        assert_eq!((v.entries, v.banned, v.bans), (2, 1, 1));
        // A reload replaces the config entries and keeps the others.
        d.configure(10, &[]);
        assert!(!d.refuses(ip("10.1.2.3"), Instant::now()));
        assert!(d.refuses(ip("192.0.2.3"), Instant::now()));
    }

    #[tokio::test]
    async fn an_upgrade_carries_api_and_ban_entries_with_their_time_left() {
        let old = DenyList::default();
        old.configure(10, &[Cidr(net("10.0.0.0/8"))]);
        let now = Instant::now();
        old.add(
            net("192.0.2.0/24"),
            Some(Duration::from_secs(3600)),
            "r".into(),
            now,
        )
        .unwrap();
        old.ban(
            net("2001:db8:1:2::/64"),
            Duration::from_secs(600),
            "b".into(),
            now,
        )
        .unwrap();
        let carried = old.carried(now);
        assert_eq!(carried.len(), 2, "not the config's: {carried:?}");
        let wire = serde_json::to_value(&carried).unwrap();
        let back: Vec<Denied> = serde_json::from_value(wire).unwrap();
        let new = DenyList::default();
        assert_eq!(new.carry_in(&back, Instant::now()), 2);
        assert_eq!(new.list(Instant::now()), carried);
        assert!(new.refuses(ip("2001:db8:1:2::7"), Instant::now()));
    }
}
