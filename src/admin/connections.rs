//! `GET /connections` and `DELETE /connections`: the process's live connections and UDP sessions
//! (`connections::Registry`), filtered, listed newest first, and ended on an operator's word.
//!
//! A listing copies the registry's handles out shard by shard (no data-plane thread waits longer
//! than one shard's copy), then reads each connection's view on this thread: its bytes are those
//! its engine last wrote (every write on the tokio engines, every tick, a second at most, on the
//! ring workers).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::config::Dur;
use crate::connections::{self, Conn, Facts, How, Protocol, State};
use crate::events::Event;
use crate::relay;

/// The most connections one answer lists unless `limit` says otherwise.
pub(super) const DEFAULT_LIMIT: usize = 1_000;

/// Which connections a request means: every given filter must match.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Filter {
    service: Option<String>,
    /// The listen address the connection reached, as listed.
    listen: Option<String>,
    /// An address (`ip:port`) or a backend's name.
    backend: Option<String>,
    client: Option<Client>,
    older_than: Option<Duration>,
    idle_longer_than: Option<Duration>,
    state: Option<Shown>,
    protocol: Option<Protocol>,
    pub(super) limit: usize,
    /// The order of a listing (`GET` only).
    order: Order,
    /// `DELETE /connections/{id}?how=`, or for every match.
    pub(super) how: How,
}

/// `sort=`: which matches a listing shows first, and so which ones `limit` keeps.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Order {
    #[default]
    Newest,
    Oldest,
    /// The most bytes moved, both ways together.
    Busiest,
    /// The longest without a byte.
    Idlest,
}

impl Order {
    fn parse(v: &str) -> Option<Order> {
        Some(match v {
            "newest" => Order::Newest,
            "oldest" => Order::Oldest,
            "busiest" => Order::Busiest,
            "idlest" => Order::Idlest,
            _ => return None,
        })
    }

    /// Puts `seen` (newest first) in this order.
    fn sort(self, seen: &mut [Seen]) {
        match self {
            Order::Newest => {}
            Order::Oldest => seen.reverse(),
            // On the bytes read once in `Seen::of`: the engines move them while this sorts, and
            // a sort whose keys change under it may panic.
            Order::Busiest => {
                seen.sort_by_key(|s| std::cmp::Reverse(s.bytes.0.saturating_add(s.bytes.1)))
            }
            Order::Idlest => seen.sort_by_key(|s| std::cmp::Reverse(s.idle)),
        }
    }
}

/// A client filter: one address (any port), one `ip:port`, or a block.
#[derive(Debug, PartialEq)]
enum Client {
    Exact(SocketAddr),
    Net(IpNet),
}

/// A connection's `state` as listed: the engine's, or `draining` while the process drains.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shown {
    Engine(State),
    Draining,
}

impl Shown {
    fn as_str(self) -> &'static str {
        match self {
            Shown::Engine(s) => s.as_str(),
            Shown::Draining => "draining",
        }
    }

    fn parse(s: &str) -> Option<Shown> {
        Some(match s {
            "connecting" => Shown::Engine(State::Connecting),
            "relaying" => Shown::Engine(State::Relaying),
            "half_closed" => Shown::Engine(State::HalfClosed),
            "draining" => Shown::Draining,
            _ => return None,
        })
    }
}

impl Filter {
    /// The filters of a query string (its values already percent-decoded by `decode`), or what is
    /// wrong with one.
    pub(super) fn parse(
        query: &str,
        decode: impl Fn(&str) -> Option<String>,
    ) -> Result<Filter, String> {
        let mut f = Filter {
            limit: DEFAULT_LIMIT,
            how: How::Reset,
            ..Filter::default()
        };
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = decode(v).ok_or_else(|| format!("{k}: {v:?} is not percent-encoded text"))?;
            f.set(k, &v)?;
        }
        Ok(f)
    }

    fn set(&mut self, k: &str, v: &str) -> Result<(), String> {
        let dur = |v: &str| {
            v.parse::<Dur>()
                .map(|d| d.0)
                .map_err(|e| format!("{k}: {e}"))
        };
        match k {
            "service" => self.service = Some(v.to_string()),
            "listen" => self.listen = Some(v.to_string()),
            "backend" => self.backend = Some(v.to_string()),
            "client" => self.client = Some(Client::parse(v)?),
            "older_than" => self.older_than = Some(dur(v)?),
            "idle_longer_than" => self.idle_longer_than = Some(dur(v)?),
            "state" => {
                self.state = Some(Shown::parse(v).ok_or_else(|| {
                    format!("state: {v:?} is not connecting, relaying, half_closed or draining")
                })?)
            }
            "protocol" => {
                self.protocol = Some(match v {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    _ => return Err(format!("protocol: {v:?} is not tcp or udp")),
                })
            }
            "limit" => {
                self.limit = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("limit: {v:?} is not a positive integer"))?
            }
            "sort" => {
                self.order = Order::parse(v).ok_or_else(|| {
                    format!("sort: {v:?} is not newest, oldest, busiest or idlest")
                })?
            }
            "how" => {
                self.how = How::parse(v).ok_or_else(|| format!("how: {v:?} is not reset or fin"))?
            }
            _ => return Err(format!(
                "unknown parameter {k:?}: filters are service, listen, backend, client, older_than, idle_longer_than, state, protocol; also limit and sort (GET) and how (DELETE)"
            )),
        }
        Ok(())
    }

    /// Whether any filter that selects connections is given (a kill by filter needs one).
    pub(super) fn selects(&self) -> bool {
        self.service.is_some()
            || self.listen.is_some()
            || self.backend.is_some()
            || self.client.is_some()
            || self.older_than.is_some()
            || self.idle_longer_than.is_some()
            || self.state.is_some()
            || self.protocol.is_some()
    }

    /// Whether `seen` matches every filter given.
    fn matches(&self, seen: &Seen) -> bool {
        let c = &seen.conn;
        let f = &seen.facts;
        self.service.as_deref().is_none_or(|s| *c.service == *s)
            && self.listen.as_deref().is_none_or(|l| *c.listen == *l)
            && self.backend.as_deref().is_none_or(|b| {
                f.backend.is_some_and(|a| a.to_string() == b)
                    || f.backend_name.as_deref().is_some_and(|n| n == b)
            })
            && self
                .client
                .as_ref()
                .is_none_or(|m| m.matches(seen.client()))
            && self.older_than.is_none_or(|d| seen.age > d)
            && self.idle_longer_than.is_none_or(|d| seen.idle > d)
            && self.state.is_none_or(|s| s == seen.state)
            && self.protocol.is_none_or(|p| p == c.protocol)
    }
}

impl Client {
    fn parse(v: &str) -> Result<Client, String> {
        if let Ok(a) = v.parse::<SocketAddr>() {
            return Ok(Client::Exact(a));
        }
        if let Ok(ip) = v.parse::<IpAddr>() {
            return Ok(Client::Net(IpNet::from(ip)));
        }
        v.parse::<IpNet>()
            .map(Client::Net)
            .map_err(|_| format!("client: {v:?} is not an address (IP or IP:port) or a CIDR block"))
    }

    fn matches(&self, a: SocketAddr) -> bool {
        match self {
            Client::Exact(e) => *e == a,
            Client::Net(n) => n.contains(&a.ip()),
        }
    }
}

/// One connection as a listing reads it, once.
struct Seen {
    conn: Arc<Conn>,
    facts: Facts,
    age: Duration,
    idle: Duration,
    state: Shown,
    /// Up and down, read once, so its line and its place in a `busiest` listing agree.
    bytes: (u64, u64),
}

impl Seen {
    fn of(conn: Arc<Conn>, draining: bool) -> Seen {
        let facts = conn.facts();
        let age = conn.born.elapsed();
        // Never longer than its life (a listing made before its first stamp).
        let idle = relay::since(conn.active().load(std::sync::atomic::Ordering::Relaxed)).min(age);
        let state = match conn.state() {
            State::Relaying | State::HalfClosed if draining => Shown::Draining,
            s => Shown::Engine(s),
        };
        Seen {
            bytes: conn.bytes(),
            conn,
            facts,
            age,
            idle,
            state,
        }
    }

    /// The client: a PROXY header's, once read, else the peer's.
    fn client(&self) -> SocketAddr {
        self.facts.client.unwrap_or(self.conn.client)
    }

    fn json(&self) -> Value {
        let (c, f) = (&self.conn, &self.facts);
        let (up, down) = self.bytes;
        let tls = match (f.tls_terminated, f.tls_originated, &f.sni) {
            (Some(v), o, _) => json!({"terminated": v, "originated": o, "sni": f.sni}),
            (None, true, _) => json!({"originated": true}),
            (None, false, Some(sni)) if c.protocol == Protocol::Tcp => json!({"passthrough": sni}),
            _ => Value::Null,
        };
        json!({
            "id": c.id,
            "protocol": c.protocol.as_str(),
            "service": &*c.service,
            "route": f.route,
            "client": self.client().to_string(),
            "via": f.via.map(|v| v.to_string()),
            "listen": (!c.listen.is_empty()).then(|| &*c.listen),
            "backend": f.backend.map(|b| b.to_string()),
            "backend_name": f.backend_name.as_deref(),
            "tier": f.tier,
            "tls": tls,
            "sni": f.sni,
            "engine": c.engine(f),
            "state": self.state.as_str(),
            "started": crate::util::rfc3339(c.started),
            "age_s": round_ms(self.age),
            "idle_s": round_ms(self.idle),
            "bytes_up": up,
            "bytes_down": down,
            "handed_over": c.handed_over,
        })
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

/// `GET /connections`: the matches in the order asked (newest first by default), at most
/// `limit`, and how many matched.
pub(super) fn list(filter: &Filter, draining: bool) -> Value {
    let mut matched = Vec::new();
    // Each connection's view is read between two chunks of the registry, with no lock held.
    connections::registry().each(|conn| {
        let seen = Seen::of(conn, draining);
        if filter.matches(&seen) {
            matched.push(seen);
        }
    });
    matched.sort_unstable_by_key(|s| std::cmp::Reverse(s.conn.id));
    filter.order.sort(&mut matched);
    let shown: Vec<Value> = matched.iter().take(filter.limit).map(Seen::json).collect();
    json!({"total": matched.len(), "connections": shown})
}

/// `GET /connections/{id}`: the connection, while it is open.
pub(super) fn list_one(id: u64, draining: bool) -> Option<Value> {
    let conn = connections::registry().get(id)?;
    Some(Seen::of(conn, draining).json())
}

/// Ends the connection `id` as `how` asks: whether this ask ended it (not one before it), and
/// what it was; `None` when no such connection is open.
pub(super) fn kill_one(
    id: u64,
    how: How,
    by: &str,
    events: &crate::events::EventBus,
) -> Option<(bool, Value)> {
    let conn = connections::registry().get(id)?;
    let seen = Seen::of(conn, false);
    let first = kill(&seen, how, by, events);
    Some((first, seen.json()))
}

/// Ends every connection `filter` matches: how many were asked to end.
pub(super) fn kill_matching(
    filter: &Filter,
    draining: bool,
    by: &str,
    events: &crate::events::EventBus,
) -> usize {
    let mut n = 0;
    for conn in connections::registry().all() {
        let seen = Seen::of(conn, draining);
        if filter.matches(&seen) && kill(&seen, filter.how, by, events) {
            n += 1;
        }
    }
    n
}

/// Asks one connection to end; the event names who asked. False when it was asked already.
fn kill(seen: &Seen, how: How, by: &str, events: &crate::events::EventBus) -> bool {
    if !seen.conn.kill(how) {
        return false;
    }
    tracing::info!(id = seen.conn.id, service = %seen.conn.service, client = %seen.client(), how = how.as_str(), by, "connection killed by an operator");
    events.publish(Event::ConnectionKilled {
        id: seen.conn.id,
        service: &seen.conn.service,
        client: seen.client(),
        backend: seen.facts.backend,
        how: how.as_str(),
        by,
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<Filter, String> {
        Filter::parse(q, |v| Some(v.replace("%2F", "/")))
    }

    #[test]
    fn filters_are_read_and_bad_ones_named() {
        let f = parse("service=web&client=10.0.0.0%2F8&older_than=5m&limit=10&how=fin").unwrap();
        assert_eq!(f.service.as_deref(), Some("web"));
        assert_eq!(f.client, Some(Client::Net("10.0.0.0/8".parse().unwrap())));
        assert_eq!(f.older_than, Some(Duration::from_secs(300)));
        assert_eq!((f.limit, f.how), (10, How::Fin));
        assert!(f.selects());
        let none = parse("limit=5&how=reset").unwrap();
        assert!(!none.selects(), "limit and how select nothing");
        assert_eq!(parse("").unwrap().limit, DEFAULT_LIMIT);
        for (q, names) in [
            ("client=nope", "client"),
            ("older_than=5", "older_than"),
            ("state=open", "state"),
            ("limit=0", "limit"),
            ("how=kill", "how"),
            ("protocol=sctp", "protocol"),
            ("colour=red", "colour"),
        ] {
            let e = parse(q).unwrap_err();
            assert!(e.contains(names), "{q}: {e}");
        }
    }

    #[test]
    fn a_client_filter_is_an_address_a_host_or_a_block() {
        let a: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let yes = ["192.0.2.7:4000", "192.0.2.7", "192.0.2.0/24"];
        let no = ["192.0.2.7:4001", "192.0.2.8", "198.51.100.0/24", "::1"];
        for v in yes {
            assert!(Client::parse(v).unwrap().matches(a), "{v}");
        }
        for v in no {
            assert!(!Client::parse(v).unwrap().matches(a), "{v}");
        }
    }

    #[test]
    fn a_listing_matches_every_filter_given() {
        let listed = connections::registry().enter(connections::Opened {
            protocol: Protocol::Tcp,
            service: Arc::from("filter-test"),
            client: "203.0.113.9:5000".parse().unwrap(),
            listen: Arc::from("127.0.0.1:80"),
            engine: "epoll",
            handed_over: None,
        });
        listed.conn().set_facts(Facts {
            backend: Some("127.0.0.1:9001".parse().unwrap()),
            backend_name: Some(Arc::new("db-1".into())),
            ..Facts::default()
        });
        listed.conn().set_state(State::Relaying);
        let count = |q: &str| list(&parse(q).unwrap(), false)["total"].as_u64().unwrap();
        assert_eq!(count("service=filter-test"), 1);
        assert_eq!(count("service=filter-test&backend=127.0.0.1:9001"), 1);
        assert_eq!(count("service=filter-test&backend=db-1"), 1);
        assert_eq!(count("service=filter-test&backend=127.0.0.1:9002"), 0);
        assert_eq!(count("service=filter-test&client=203.0.113.0%2F24"), 1);
        assert_eq!(count("service=filter-test&state=relaying"), 1);
        assert_eq!(count("service=filter-test&state=connecting"), 0);
        assert_eq!(count("service=filter-test&older_than=1h"), 0);
        assert_eq!(count("service=filter-test&protocol=udp"), 0);
        let shown = list(&parse("service=filter-test").unwrap(), true);
        assert_eq!(shown["connections"][0]["state"], "draining");
        assert_eq!(shown["connections"][0]["backend_name"], "db-1");
        assert_eq!(shown["connections"][0]["listen"], "127.0.0.1:80");
    }

    #[test]
    fn a_listing_comes_in_the_order_asked() {
        let held: Vec<_> = [5u64, 50, 20]
            .iter()
            .map(|&bytes| {
                let r = connections::registry().enter(connections::Opened {
                    service: Arc::from("sort-test"),
                    ..opened_at(bytes as usize)
                });
                r.conn().moved(bytes, 1, 0);
                r
            })
            .collect();
        let ids = |q: &str| -> Vec<u64> {
            list(&parse(&format!("service=sort-test&{q}")).unwrap(), false)["connections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_u64().unwrap())
                .collect()
        };
        let [a, b, c] = [0, 1, 2].map(|i| held[i].conn().id);
        assert_eq!(ids(""), vec![c, b, a], "newest first by default");
        assert_eq!(ids("sort=oldest"), vec![a, b, c]);
        assert_eq!(ids("sort=busiest"), vec![b, c, a]);
        assert_eq!(
            ids("sort=busiest&limit=1"),
            vec![b],
            "limit keeps the first in that order"
        );
        let e = parse("sort=loudest").unwrap_err();
        assert!(e.contains("sort") && e.contains("busiest"), "{e}");
    }

    fn opened_at(i: usize) -> connections::Opened {
        connections::Opened {
            protocol: Protocol::Tcp,
            service: Arc::from("listing"),
            client: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000)),
            listen: Arc::from("127.0.0.1:80"),
            engine: "epoll",
            handed_over: None,
        }
    }

    /// This thread's voluntary context switches so far (each a wait, on a lock among others).
    fn waits() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// One phase: a data-plane stand-in opens, updates and closes connections for `phase` (each
    /// step what a connection's life does to the registry), while `list` runs back to back on
    /// another thread if asked. Answers the stand-in's slowest step, its 99.9th percentile, its
    /// waits per 1,000 steps, and the listings' durations.
    fn phase(held: &[connections::Registered], listing: bool) -> (f64, f64, f64, Vec<f64>) {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        use tokio::time::Instant;
        let phase = Duration::from_millis(1500);
        let stop = AtomicBool::new(false);
        let n = held.len() as u64;
        std::thread::scope(|scope| {
            let lister = listing.then(|| {
                scope.spawn(|| {
                    let (all, mut took) = (parse("").unwrap(), Vec::new());
                    while !stop.load(Relaxed) && took.len() < 10_000 {
                        let t = Instant::now();
                        let v = list(&all, false);
                        took.push(t.elapsed().as_secs_f64() * 1e3);
                        assert!(v["total"].as_u64().unwrap() >= n);
                    }
                    took
                })
            });
            // Written through before the clock starts, so the stand-in's own page faults (which
            // wait on the address space's lock while the lister allocates) are not counted.
            let mut steps = vec![f64::MAX; 5_000_000];
            steps.clear();
            let (start, before) = (Instant::now(), waits());
            while start.elapsed() < phase && steps.len() < 5_000_000 {
                let i = steps.len();
                let t = Instant::now();
                let r = connections::registry().enter(opened_at(i));
                r.conn().set_state(State::Relaying);
                let other = held[i * 7919 % held.len()].conn();
                other.moved(100, 100, 0);
                let _ = other.facts();
                drop(r);
                steps.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let waited = (waits() - before) as f64 * 1000.0 / steps.len() as f64;
            stop.store(true, Relaxed);
            let took = lister.map(|l| l.join().unwrap()).unwrap_or_default();
            steps.sort_by(f64::total_cmp);
            let p999 = steps[steps.len() * 999 / 1000];
            (steps[steps.len() - 1], p999, waited, took)
        })
    }

    /// The cost of listing 100,000 connections, for benchmarks/console_listing.py: a measurement,
    /// not a check (the machine is shared, so nothing is held to a time). Each round runs a phase
    /// without a listing and one with listings back to back, and prints both.
    #[test]
    #[ignore = "a measurement, run by benchmarks/console_listing.py"]
    fn listing_figures_at_100k_connections() {
        let n = std::env::var("SLUICEGATE_LISTING_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000usize);
        let held: Vec<_> = (0..n)
            .map(|i| {
                let r = connections::registry().enter(opened_at(i));
                r.conn().set_facts(Facts {
                    backend: Some(SocketAddr::from(([127, 0, 0, 1], 9000 + (i % 8) as u16))),
                    ..Facts::default()
                });
                r.conn().set_state(State::Relaying);
                r
            })
            .collect();
        let rounds = std::env::var("SLUICEGATE_LISTING_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(6usize);
        for round in 0..rounds {
            let (q_max, q_p999, q_waits, _) = phase(&held, false);
            let (b_max, b_p999, b_waits, mut took) = phase(&held, true);
            took.sort_by(f64::total_cmp);
            let median = took.get(took.len() / 2).copied().unwrap_or(f64::NAN);
            println!(
                "{}",
                json!({"n": n, "round": round, "quiet_max_us": q_max, "quiet_p999_us": q_p999,
                    "quiet_waits_per_1k": q_waits, "listing_max_us": b_max, "listing_p999_us": b_p999,
                    "listing_waits_per_1k": b_waits, "listings": took.len(), "list_ms_median": median})
            );
        }
    }
}
