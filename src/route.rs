//! The routes of one listen address: which of the services sharing it a new connection belongs to,
//! decided from the server name (SNI) and protocols (ALPN) of the client's TLS ClientHello, or from
//! their absence. The decision is pure ([`Table::choose`], unit-tested here); [`Routes`] is what an
//! address's accept loops read (swapped as a whole by a reload), and the session reads the hello and
//! acts on the choice.
//!
//! The order, most specific first: a route naming the server name exactly, then a wildcard route
//! (`*.suffix`, exactly one more label), then a route without names (for clients that sent none, or
//! a name nobody claims). At each of those levels a route narrowed by ALPN to a protocol the client
//! offers wins (the client's first such protocol), else the level's route without ALPN; if neither,
//! the next level is asked. The route without names and without ALPN is the address's default. The
//! config's validation guarantees each level holds at most one answer.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{AcceptProxyConfig, RelayMode, RouteKeys, SniName};
use crate::metrics::{Family, Kind, Subject, Table as MetricTable};
use crate::outcome::Outcome;
use crate::service::Service;

/// What one listen address's accept loops read: its routes, and what is read before a route is
/// known (the same for every service of the address: the config's validation says so).
pub(crate) struct Routes {
    pub(crate) table: Table<Arc<ArcSwap<Service>>>,
    /// The PROXY header read from the balancers in front, before the hello.
    pub(crate) accept_proxy: Option<AcceptProxyConfig>,
    /// How long the whole ClientHello may take to arrive.
    pub(crate) hello_timeout: Duration,
    /// How many connections may wait for their route at once (`max_pending`).
    pub(crate) max_pending: u32,
    /// The connections no service took, counted by how they ended; kept across reloads.
    pub(crate) unrouted: Arc<Unrouted>,
}

impl Routes {
    /// Whether the ring workers serve this address: its one service runs on the ring (as it runs:
    /// `ring`, or `auto` resolved to it; where io_uring is unavailable both run `epoll`). A shared
    /// address, or any other engine, is the tokio workers'.
    pub(crate) fn on_ring(&self) -> bool {
        self.table
            .only()
            .is_some_and(|s| s.load().relay.mode == RelayMode::Ring)
    }
}

/// The connections of an address that no service took: no route for them, a hello that was not one,
/// a PROXY header refused before the route was known.
///
/// It also owns the count of the connections waiting for their route now ([`Unrouted::wait`]),
/// bounded by `max_pending`: each of them holds a descriptor and a task, and on a shared address
/// nothing else bounds them but the optional top-level `max_connections`.
#[derive(Debug, Default)]
pub(crate) struct Unrouted {
    ends: [AtomicU64; Outcome::ALL.len()],
    /// Connections reading their PROXY header or ClientHello now.
    pending: AtomicU32,
    /// Refused PROXY headers and hellos are logged at most once a second per address.
    pub(crate) warnings: std::sync::Mutex<crate::util::RateLimited>,
}

impl Unrouted {
    pub(crate) fn count(&self, end: Outcome) {
        self.ends[end.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn ended(&self, end: Outcome) -> u64 {
        self.ends[end.index()].load(Relaxed)
    }

    /// A place among the connections waiting for their route, held until the [`Waiting`] drops;
    /// `None` when `max` already wait (the caller closes the connection, counted `pending_full`).
    pub(crate) fn wait(self: &Arc<Self>, max: u32) -> Option<Waiting> {
        self.pending
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(Waiting(self.clone()))
    }

    /// How many connections wait for their route now.
    pub(crate) fn pending(&self) -> u32 {
        self.pending.load(Relaxed)
    }
}

/// One connection's place among those waiting for their route; given back when dropped.
#[derive(Debug)]
pub(crate) struct Waiting(Arc<Unrouted>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Relaxed);
    }
}

/// How a connection can end before any service takes it.
pub(crate) const UNROUTED_ENDS: [Outcome; 6] = [
    Outcome::NoRoute,
    Outcome::TlsHello,
    Outcome::ProxyHeader,
    Outcome::DrainDeadline,
    Outcome::PendingFull,
    Outcome::Denied,
];

/// An address's unrouted connections at one moment (`/metrics`, `/stats`).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct UnroutedView {
    pub(crate) listen: String,
    /// By how they ended.
    pub(crate) ends: std::collections::BTreeMap<&'static str, u64>,
    /// Waiting for their route now.
    pub(crate) pending: u32,
}

impl UnroutedView {
    pub(crate) fn of(listen: SocketAddr, u: &Unrouted) -> UnroutedView {
        UnroutedView {
            listen: listen.to_string(),
            ends: UNROUTED_ENDS
                .iter()
                .map(|e| (e.as_str(), u.ended(*e)))
                .collect(),
            pending: u.pending(),
        }
    }
}

impl Subject for UnroutedView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.listen.as_str())
    }
}

/// What `/metrics` exports about the connections of each routed address that no service took.
pub(crate) const METRICS: MetricTable<UnroutedView> = MetricTable {
    subject: &["listen"],
    families: &[
        Family::new(
            Kind::Counter,
            "sluicegate_unrouted_connections_total",
            "Connections to a shared (routed) address that no service took, by how they ended (no_route, tls_hello, proxy_header, pending_full, denied, ...).",
            &["end"],
            |u, o| {
                for (end, n) in &u.ends {
                    o.put(&[end], *n);
                }
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_unrouted_pending",
            "Connections to a shared (routed) address waiting for their route now (PROXY header, ClientHello), at most max_pending.",
            &[],
            |u, o| o.put(&[], u64::from(u.pending)),
        ),
    ],
};

/// Why a connection went where it went: what matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Its server name is one of the route's exact names.
    Exact { alpn: bool },
    /// Its server name is one label in front of one of the route's wildcards.
    Wildcard { alpn: bool },
    /// The route names no server, and narrows by a protocol the client offered.
    Alpn,
    /// The address's default: no names, no protocols.
    Default,
}

impl Why {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Why::Exact { alpn: false } => "exact",
            Why::Exact { alpn: true } => "exact+alpn",
            Why::Wildcard { alpn: false } => "wildcard",
            Why::Wildcard { alpn: true } => "wildcard+alpn",
            Why::Alpn => "alpn",
            Why::Default => "default",
        }
    }
}

impl Why {
    /// The `&'static` name of a reason given as text (a connection carried in from another process).
    pub(crate) fn named(s: &str) -> Option<&'static str> {
        [
            Why::Exact { alpn: false },
            Why::Exact { alpn: true },
            Why::Wildcard { alpn: false },
            Why::Wildcard { alpn: true },
            Why::Alpn,
            Why::Default,
        ]
        .iter()
        .map(Why::as_str)
        .find(|n| *n == s)
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route's answer: its target, why, and the protocol that narrowed it (if one did).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Chosen<'a, T> {
    pub(crate) target: &'a T,
    pub(crate) why: Why,
    pub(crate) protocol: Option<&'a [u8]>,
}

/// The routes of one address, each with what it leads to (a service).
#[derive(Debug, Clone)]
pub(crate) struct Table<T> {
    routes: Vec<(RouteKeys, T)>,
}

/// A level of specificity: which routes it holds for a server name.
#[derive(Clone, Copy)]
enum Level {
    Exact,
    Wildcard,
    Unnamed,
}

impl<T> Table<T> {
    pub(crate) fn new(routes: Vec<(RouteKeys, T)>) -> Table<T> {
        Table { routes }
    }

    /// The single route of an address that needs no hello.
    pub(crate) fn only(&self) -> Option<&T> {
        match self.routes.as_slice() {
            [(keys, t)] if keys.is_default() => Some(t),
            _ => None,
        }
    }

    pub(crate) fn targets(&self) -> impl Iterator<Item = &T> {
        self.routes.iter().map(|(_, t)| t)
    }

    /// What `GET /route` says of a client: the address's one service (`only`: no hello is read),
    /// else the route [`choose`](Table::choose) takes, with why.
    pub(crate) fn explain<'a>(
        &'a self,
        sni: Option<&str>,
        alpn: &'a [Vec<u8>],
    ) -> Option<(&'a T, &'static str)> {
        if let Some(only) = self.only() {
            return Some((only, "only"));
        }
        self.choose(sni, alpn).map(|c| (c.target, c.why.as_str()))
    }

    /// Where a client that sent server name `sni` (or none, or no hello at all) and offered the
    /// protocols `alpn` (in its order of preference) goes; `None`: nowhere (no default).
    pub(crate) fn choose<'a>(
        &'a self,
        sni: Option<&str>,
        alpn: &'a [Vec<u8>],
    ) -> Option<Chosen<'a, T>> {
        for level in [Level::Exact, Level::Wildcard, Level::Unnamed] {
            let at_level = |keys: &RouteKeys| match (level, sni) {
                (Level::Unnamed, _) => keys.sni.is_empty(),
                (_, None) => false,
                (Level::Exact, Some(name)) => keys
                    .sni
                    .iter()
                    .any(|n| matches!(n, SniName::Exact(_)) && n.matches(name)),
                (Level::Wildcard, Some(name)) => keys
                    .sni
                    .iter()
                    .any(|n| matches!(n, SniName::Wildcard(_)) && n.matches(name)),
            };
            let routes = || self.routes.iter().filter(|(keys, _)| at_level(keys));
            let narrowed = alpn.iter().find_map(|p| {
                routes()
                    .find(|(keys, _)| keys.alpn.iter().any(|q| q.0 == *p))
                    .map(|(_, t)| (t, p.as_slice()))
            });
            if let Some((target, protocol)) = narrowed {
                let why = match level {
                    Level::Exact => Why::Exact { alpn: true },
                    Level::Wildcard => Why::Wildcard { alpn: true },
                    Level::Unnamed => Why::Alpn,
                };
                return Some(Chosen {
                    target,
                    why,
                    protocol: Some(protocol),
                });
            }
            if let Some((_, target)) = routes().find(|(keys, _)| keys.alpn.is_empty()) {
                let why = match level {
                    Level::Exact => Why::Exact { alpn: false },
                    Level::Wildcard => Why::Wildcard { alpn: false },
                    Level::Unnamed => Why::Default,
                };
                return Some(Chosen {
                    target,
                    why,
                    protocol: None,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn keys(sni: &[&str], alpn: &[&str]) -> RouteKeys {
        RouteKeys {
            sni: sni.iter().map(|s| s.parse().unwrap()).collect(),
            alpn: alpn
                .iter()
                .map(|p| Protocol(p.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn table() -> Table<&'static str> {
        Table::new(vec![
            (keys(&["a.example.com", "www.example.com"], &[]), "site"),
            (keys(&["a.example.com"], &["acme-tls/1"]), "acme"),
            (keys(&["*.b.example"], &[]), "wild"),
            (keys(&["db.b.example"], &[]), "db"),
            (keys(&[], &["xmpp-client"]), "xmpp"),
            (keys(&[], &[]), "default"),
        ])
    }

    fn go(
        t: &Table<&'static str>,
        sni: Option<&str>,
        alpn: &[&str],
    ) -> Option<(&'static str, &'static str)> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        t.choose(sni, &alpn).map(|c| (*c.target, c.why.as_str()))
    }

    #[test]
    fn the_most_specific_route_wins() {
        let t = table();
        assert_eq!(
            go(&t, Some("A.Example.Com"), &["h2"]),
            Some(("site", "exact"))
        );
        assert_eq!(
            go(&t, Some("a.example.com"), &["acme-tls/1"]),
            Some(("acme", "exact+alpn"))
        );
        assert_eq!(go(&t, Some("x.b.example"), &[]), Some(("wild", "wildcard")));
        assert_eq!(
            go(&t, Some("db.b.example"), &[]),
            Some(("db", "exact")),
            "exact before wildcard"
        );
        assert_eq!(
            go(&t, Some("y.x.b.example"), &[]),
            Some(("default", "default"))
        );
        assert_eq!(go(&t, Some("b.example"), &[]), Some(("default", "default")));
        assert_eq!(
            go(&t, None, &[]),
            Some(("default", "default")),
            "no name, or no hello"
        );
        assert_eq!(go(&t, None, &["xmpp-client"]), Some(("xmpp", "alpn")));
        assert_eq!(
            go(&t, Some("chat.example"), &["h2", "xmpp-client"]),
            Some(("xmpp", "alpn"))
        );
        // A name's protocol route does not catch other protocols of that name.
        assert_eq!(
            go(&t, Some("a.example.com"), &["xmpp-client"]),
            Some(("site", "exact"))
        );
    }

    #[test]
    fn without_a_default_unknown_clients_go_nowhere() {
        let t = Table::new(vec![
            (keys(&["a.example"], &[]), "a"),
            (keys(&["*.b"], &["h2"]), "b"),
        ]);
        assert!(t.only().is_none(), "its hello must be read");
        assert_eq!(go(&t, Some("z.example"), &[]), None);
        assert_eq!(go(&t, None, &[]), None);
        assert_eq!(
            go(&t, Some("x.b"), &["http/1.1"]),
            None,
            "the protocol narrows"
        );
        assert_eq!(
            go(&t, Some("x.b"), &["http/1.1", "h2"]),
            Some(("b", "wildcard+alpn"))
        );
    }

    #[test]
    fn a_plain_service_alone_needs_no_hello() {
        let t = Table::new(vec![(keys(&[], &[]), "only")]);
        assert_eq!(t.only(), Some(&"only"));
        let named = Table::new(vec![(keys(&["a.example"], &[]), "a")]);
        assert!(
            named.only().is_none(),
            "one named route still reads the hello"
        );
    }

    #[test]
    fn the_clients_order_of_protocols_decides_between_protocol_routes() {
        let t = Table::new(vec![
            (keys(&["a.x"], &["h2"]), "h2"),
            (keys(&["a.x"], &["http/1.1"]), "h1"),
        ]);
        assert_eq!(
            go(&t, Some("a.x"), &["http/1.1", "h2"]),
            Some(("h1", "exact+alpn"))
        );
        assert_eq!(
            go(&t, Some("a.x"), &["h2", "http/1.1"]),
            Some(("h2", "exact+alpn"))
        );
    }

    /// The ring workers accept on an address only when its one service runs on the ring: asked
    /// for (`relay: ring`) or chosen (`auto`, plain TCP alone on its address).
    #[test]
    fn places_to_wait_for_a_route_are_bounded_and_given_back() {
        let u = Arc::new(Unrouted::default());
        let held: Vec<Waiting> = (0..3).map(|_| u.wait(3).expect("room")).collect();
        assert_eq!(u.pending(), 3);
        assert!(u.wait(3).is_none(), "full at max_pending");
        drop(held);
        assert_eq!(u.pending(), 0, "every place given back");
        assert!(u.wait(1).is_some());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_an_address_of_one_ring_service_is_the_rings() {
        if crate::relay::uring::missing_in_test() {
            return;
        }
        let cfg = crate::config::Config::from_yaml(
            "services:
  - {name: r, listen: 127.0.0.1:0, relay: ring, backends: [{address: 127.0.0.1:9}]}
  - {name: e, listen: 127.0.0.1:0, relay: epoll, backends: [{address: 127.0.0.1:9}]}
  - {name: b, listen: 127.0.0.1:0, sni: [b.example], backends: [{address: 127.0.0.1:9}]}
  - {name: a, listen: 127.0.0.1:0, backends: [{address: 127.0.0.1:9}]}
",
        )
        .unwrap();
        let routes = |of: &[usize]| Routes {
            table: Table::new(
                of.iter()
                    .map(|&i| {
                        let s = &cfg.services[i];
                        let service = Service::new(
                            s,
                            true,
                            crate::tls::ServiceTls::default(),
                            &crate::events::EventBus::default(),
                        );
                        (s.route_keys(), Arc::new(ArcSwap::from_pointee(service)))
                    })
                    .collect(),
            ),
            accept_proxy: None,
            hello_timeout: Duration::from_secs(5),
            max_pending: crate::config::DEFAULT_MAX_PENDING,
            unrouted: Arc::new(Unrouted::default()),
        };
        assert!(routes(&[0]).on_ring(), "one ring service");
        assert!(!routes(&[1]).on_ring(), "one epoll service");
        assert!(
            routes(&[3]).on_ring(),
            "one auto service, plain TCP on its own"
        );
        assert!(
            !routes(&[0, 2]).on_ring(),
            "a shared address has routes to read"
        );
    }
}
