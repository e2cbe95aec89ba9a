//! The numbers the admin API shows: per-backend views, and a sampler that turns the counters into a
//! stats frame with rates once a second (for `/stats`, the event stream and the dashboard's charts).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::control::{Control, ControlView, RunningService};
use crate::discovery::docker::LabelView;
use crate::discovery::WatchView;
use crate::health::ProbeRecord;
use crate::pool::{Backend, BackendView, Source, State};
use crate::service::ServiceView;
use crate::udp::CountsView;
use crate::util::{lock, unix_ms};

/// Frames kept for the dashboard's charts: five minutes.
const HISTORY: usize = 300;
const PERIOD: Duration = Duration::from_secs(1);

/// One backend as the API shows it: its view plus the service it belongs to, and the flat names
/// scripts read (docs/admin-api.md): the primary source as `static`, `dns` (with `dns_name`) or
/// `api`, and bytes in (client → backend) / out, failed connects.
#[derive(Serialize)]
struct BackendEntry<'a> {
    #[serde(flatten)]
    view: BackendView,
    service: &'a str,
    last_probe: Option<ProbeRecord>,
    source: &'static str,
    dns_name: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    failed_connects: u64,
}

impl<'a> BackendEntry<'a> {
    fn new(service: &'a str, b: &Backend) -> BackendEntry<'a> {
        let view = b.view();
        let (source, dns_name) = match view.sources.first() {
            Some(Source::Dns(name)) => ("dns", Some(name.to_string())),
            Some(Source::Srv(_)) => ("srv", b.dns_name()),
            Some(Source::Api) => ("api", None),
            Some(Source::Docker | Source::Labels(_)) => ("docker", None),
            Some(Source::Static) | None => ("static", None),
        };
        BackendEntry {
            service,
            last_probe: view.probes.last().cloned(),
            source,
            dns_name,
            bytes_in: view.bytes_up,
            bytes_out: view.bytes_down,
            failed_connects: view.failed,
            view,
        }
    }
}

/// One backend as JSON: its view plus the service it belongs to.
pub(super) fn backend_json(service: &str, b: &Backend) -> Value {
    serde_json::to_value(BackendEntry::new(service, b)).unwrap_or(Value::Null)
}

/// What the replicas of every service say about themselves, by (service, address).
pub(super) fn replica_info(c: &Control) -> HashMap<(Arc<str>, SocketAddr), Value> {
    let mut m = HashMap::new();
    for view in c.services() {
        let name = view.service.name.clone();
        if let Some(set) = c.replicas(&name) {
            for r in set.replicas() {
                if let Some(a) = r.address {
                    m.insert(
                        (name.clone(), a),
                        serde_json::to_value(&r).unwrap_or(Value::Null),
                    );
                }
            }
        }
    }
    m
}

/// Every backend of every service (members and removed ones still holding sessions); a replica
/// sluicegate runs also says which (`replica`: hostname, container, state, what it replaced and why).
pub(super) fn backends(c: &Control) -> Vec<Value> {
    let replicas = replica_info(c);
    let instance = c.instance();
    c.backends()
        .iter()
        .map(|(svc, b)| {
            let mut v = backend_json(svc, b);
            v["instance"] = Value::from(instance);
            if let Some(r) = replicas.get(&(svc.clone(), b.addr)) {
                v["replica"] = r.clone();
            }
            v
        })
        .collect()
}

/// Jain's fairness index of the connections each backend got against its weight: 1 when every
/// backend's share matches its weight, down to 1/n when one backend got everything.
pub(super) fn jain(totals_and_weights: &[(u64, u32)]) -> Option<f64> {
    let x: Vec<f64> = totals_and_weights
        .iter()
        .map(|&(t, w)| t as f64 / w.max(1) as f64)
        .collect();
    let sum: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    (sum > 0.0).then(|| sum * sum / (x.len() as f64 * sq))
}

/// Computes a frame every second; keeps the latest (as JSON text), and the last five minutes of rates for the
/// charts as numbers: per service, and per backend for the first [`CHARTED`] of each service.
#[derive(Clone)]
pub(super) struct Sampler {
    latest: watch::Receiver<Arc<str>>,
    history: Arc<Mutex<History>>,
}

impl Sampler {
    /// Starts sampling on the current (admin) runtime until `stop`.
    pub(super) fn start(control: Arc<Control>, stop: CancellationToken) -> Sampler {
        let mut prev = Previous::default();
        let (first, _) = frame(&control, &mut prev);
        let (tx, rx) = watch::channel::<Arc<str>>(first.text.into());
        let history = Arc::new(Mutex::new(History::default()));
        let h = history.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let (f, rates) = frame(&control, &mut prev);
                lock(&h).push(f.at_ms, rates);
                let _ = tx.send(f.text.into());
            }
        });
        Sampler {
            latest: rx,
            history,
        }
    }

    /// The latest frame, as a JSON value (parsed from its text: only the text is kept).
    pub(super) fn latest_value(&self) -> Value {
        let text = self.latest.borrow().clone();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// The chart history as frames, oldest first: `at_ms` and per service `name`, `active`,
    /// `conn_rate`, `bytes_rate` and `backends` (`address`, `active`, `conn_rate`, `bytes_rate`) for
    /// the charted ones.
    pub(super) fn history(&self) -> Value {
        lock(&self.history).to_json()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<str>> {
        self.latest.clone()
    }
}

/// Backends per service whose rates the history keeps: the first ones in the order `/stats` lists
/// them, as many as the dashboard charts. Beyond a few dozen lines a chart says nothing, and a
/// history for every backend would cost memory in proportion to the backends times five minutes.
pub(super) const CHARTED: usize = 32;

/// The numbers a chart plots at one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    active: u64,
    conn_rate: f64,
    bytes_rate: f64,
}

/// What one frame adds to the history: per service its point and those of its charted backends.
type Rates = Vec<ServiceRates>;
type ServiceRates = (Arc<str>, Point, Vec<(SocketAddr, Point)>);

/// One series: the points of the latest frames (the older frames, before it appeared, have none).
#[derive(Debug)]
struct Series<K> {
    key: K,
    points: VecDeque<Point>,
}

/// The last [`HISTORY`] frames of rates, as numbers: at most one series per service and [`CHARTED`]
/// per service's backends, each at most [`HISTORY`] points. A series ends when its service or
/// backend is not in a frame (or no longer among the charted ones): the dashboard draws only those
/// in the latest frame.
#[derive(Debug, Default)]
struct History {
    at_ms: VecDeque<u64>,
    services: Vec<Charted>,
}

/// A service's series and those of its charted backends.
#[derive(Debug)]
struct Charted {
    service: Series<Arc<str>>,
    backends: Vec<Series<SocketAddr>>,
}

impl History {
    fn push(&mut self, at_ms: u64, rates: Rates) {
        self.at_ms.push_back(at_ms);
        if self.at_ms.len() > HISTORY {
            self.at_ms.pop_front();
        }
        let mut old: HashMap<Arc<str>, Charted> = self
            .services
            .drain(..)
            .map(|c| (c.service.key.clone(), c))
            .collect();
        for (name, point, backends) in rates {
            let Charted {
                mut service,
                backends: old_backends,
            } = old.remove(&name).unwrap_or_else(|| Charted {
                service: Series {
                    key: name,
                    points: VecDeque::new(),
                },
                backends: Vec::new(),
            });
            append(&mut service.points, point);
            let mut by_addr: HashMap<SocketAddr, Series<SocketAddr>> =
                old_backends.into_iter().map(|b| (b.key, b)).collect();
            let charted = backends
                .into_iter()
                .take(CHARTED)
                .map(|(addr, point)| {
                    let mut b = by_addr.remove(&addr).unwrap_or(Series {
                        key: addr,
                        points: VecDeque::new(),
                    });
                    append(&mut b.points, point);
                    b
                })
                .collect();
            self.services.push(Charted {
                service,
                backends: charted,
            });
        }
    }

    /// The frames, oldest first, in the shape the dashboard reads.
    fn to_json(&self) -> Value {
        let n = self.at_ms.len();
        // The point of `s` at frame `i`, if `s` existed then (its points are the latest ones).
        fn at<K>(s: &Series<K>, n: usize, i: usize) -> Option<Point> {
            let first = n - s.points.len();
            (i >= first).then(|| s.points[i - first])
        }
        let frames = self.at_ms.iter().enumerate().map(|(i, at_ms)| {
            let services: Vec<Value> = self
                .services
                .iter()
                .filter_map(|c| {
                    let s = &c.service;
                    let p = at(s, n, i)?;
                    let backends: Vec<Value> = c
                        .backends
                        .iter()
                        .filter_map(|b| {
                            let q = at(b, n, i)?;
                            Some(json!({"address": b.key, "active": q.active,
                                        "conn_rate": q.conn_rate, "bytes_rate": q.bytes_rate}))
                        })
                        .collect();
                    Some(
                        json!({"name": &*s.key, "active": p.active, "conn_rate": p.conn_rate,
                                "bytes_rate": p.bytes_rate, "backends": backends}),
                    )
                })
                .collect();
            json!({"at_ms": at_ms, "services": services})
        });
        Value::Array(frames.collect())
    }
}

/// Appends a point, keeping at most [`HISTORY`].
fn append(points: &mut VecDeque<Point>, p: Point) {
    points.push_back(p);
    if points.len() > HISTORY {
        points.pop_front();
    }
}

/// Counter values at the previous frame, by key, for per-second rates. Each frame's values replace
/// the previous ones as a whole, so whatever a frame did not see (a departed backend, a removed
/// service) is forgotten: the memory is that of one frame.
#[derive(Debug)]
struct Counters<K> {
    before: HashMap<K, (u64, u64)>,
    now: HashMap<K, (u64, u64)>,
}

impl<K> Default for Counters<K> {
    fn default() -> Self {
        Counters {
            before: HashMap::new(),
            now: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Counters<K> {
    /// Records `key`'s two counters for this frame; their rates since the previous frame, `secs`
    /// ago (0 for a key the previous frame did not have).
    fn rates(&mut self, key: K, counts: (u64, u64), secs: f64) -> (f64, f64) {
        let before = self.before.get(&key).copied();
        self.now.insert(key, counts);
        (
            rate(counts.0, before.map(|b| b.0), secs),
            rate(counts.1, before.map(|b| b.1), secs),
        )
    }

    /// Ends a frame: its values become the previous ones.
    fn end_frame(&mut self) {
        std::mem::swap(&mut self.before, &mut self.now);
        self.now.clear();
        // After a pool shrinks, do not keep room for the old size forever.
        if self.now.capacity() > 2 * self.before.len() + 64 {
            self.now.shrink_to(self.before.len());
        }
    }
}

/// Counters at the previous frame, for rates.
#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    services: Counters<Arc<str>>,
    backends: Counters<(Arc<str>, SocketAddr)>,
}

fn rate(now: u64, before: Option<u64>, secs: f64) -> f64 {
    match before {
        Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
        _ => 0.0,
    }
}

/// A `/stats` frame, serialized straight to text: a frame lists every backend every second, so no
/// JSON tree is built for it. Its numbers are the subsystems' views (`ControlView`, `ServiceView`,
/// `WatchView`, `LabelView`, `BackendView`), the ones `/metrics` exports.
#[derive(Serialize)]
struct Frame<'a> {
    at_ms: u64,
    #[serde(flatten)]
    control: ControlView,
    services: Vec<ServiceFrame<'a>>,
    /// The connections of each shared address no service took.
    unrouted: Vec<crate::route::UnroutedView>,
}

#[derive(Serialize)]
struct ServiceFrame<'a> {
    #[serde(flatten)]
    view: ServiceView,
    listen: SocketAddr,
    /// Every address it listens on (several with a list or a port range).
    listens: &'a [SocketAddr],
    conn_rate: f64,
    bytes_rate: f64,
    fairness: Option<f64>,
    replicas: Option<Value>,
    dns: Vec<WatchView>,
    /// Its `docker:` backend sources' counters.
    docker_labels: Vec<LabelView>,
    backends: Vec<FrameBackend<'a>>,
    /// A UDP service's sessions, datagrams, bytes and drops (docs/admin-api.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    udp: Option<Value>,
}

/// A backend in a frame: the backend object plus its rates.
#[derive(Serialize)]
struct FrameBackend<'a> {
    #[serde(flatten)]
    entry: BackendEntry<'a>,
    conn_rate: f64,
    bytes_rate: f64,
    /// A UDP service's counters for this backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    udp: Option<Value>,
}

/// The UDP counters a frame shows, read once: per service and per service's backend.
#[derive(Default)]
struct UdpCounts {
    services: HashMap<Arc<str>, CountsView>,
    backends: HashMap<(Arc<str>, SocketAddr), CountsView>,
}

impl UdpCounts {
    fn read(c: &Control) -> UdpCounts {
        UdpCounts {
            services: c
                .udp
                .views()
                .into_iter()
                .map(|v| (v.service, v.counts))
                .collect(),
            backends: c
                .udp
                .backend_views()
                .into_iter()
                .map(|v| ((v.service, v.backend), v.counts))
                .collect(),
        }
    }
}

/// A frame as sent: its time and its JSON text.
struct FrameText {
    at_ms: u64,
    text: String,
}

/// Everything `/stats` shows, as JSON text, with rates since the previous frame; and the rates for
/// the history. Linear in the backends: one pass over each service's, one map lookup each.
fn frame(c: &Control, prev: &mut Previous) -> (FrameText, Rates) {
    let now = Instant::now();
    let secs = prev
        .at
        .map(|t| now.duration_since(t).as_secs_f64())
        .unwrap_or(0.0);
    prev.at = Some(now);
    let running = c.services();
    let udp = UdpCounts::read(c);
    let mut rates = Vec::with_capacity(running.len());
    let services = running
        .iter()
        .map(|r| {
            let (f, point) = service_frame(c, r, &udp, prev, secs);
            rates.push(point);
            f
        })
        .collect();
    // Only this frame's backends and services are remembered.
    prev.backends.end_frame();
    prev.services.end_frame();
    let at_ms = unix_ms();
    let f = Frame {
        at_ms,
        control: c.view(),
        services,
        unrouted: c.unrouted(),
    };
    let text = serde_json::to_string(&f).unwrap_or_else(|e| {
        // Nothing in a frame fails to serialize; say so loudly if it ever does.
        tracing::error!(error = %e, "cannot serialize a stats frame");
        String::from("{}")
    });
    (FrameText { at_ms, text }, rates)
}

/// One service's part of a frame, and what it adds to the history.
fn service_frame<'a>(
    c: &Control,
    r: &'a RunningService,
    udp: &UdpCounts,
    prev: &mut Previous,
    secs: f64,
) -> (ServiceFrame<'a>, ServiceRates) {
    let s = &r.service;
    let is_udp = s.protocol == crate::config::Transport::Udp;
    let all = s.pool.all_backends();
    let mut backends = Vec::with_capacity(all.len());
    let mut charted = Vec::new();
    let mut fairness_input = Vec::with_capacity(all.len());
    let mut bytes_total = 0;
    for b in &all {
        let entry = BackendEntry::new(&s.name, b);
        let v = &entry.view;
        let key = (s.name.clone(), v.address);
        // A UDP service's backends all carry `udp` (zeros before their first session); a name
        // that was UDP before a reload keeps its counters a while, but a TCP service shows none.
        let udp_counts = is_udp.then(|| udp.backends.get(&key).copied().unwrap_or_default());
        // A UDP session's bytes reach its backend's own counters when it ends; these move.
        let bytes = match &udp_counts {
            Some(u) => u.bytes.iter().sum(),
            None => v.bytes_up + v.bytes_down,
        };
        bytes_total += bytes;
        let (conn_rate, bytes_rate) = prev.backends.rates(key, (v.total, bytes), secs);
        if v.state != State::Removed {
            fairness_input.push((v.total, v.weight));
        }
        if charted.len() < CHARTED {
            let point = Point {
                active: v.active,
                conn_rate,
                bytes_rate,
            };
            charted.push((v.address, point));
        }
        backends.push(FrameBackend {
            entry,
            conn_rate,
            bytes_rate,
            udp: udp_counts.as_ref().map(CountsView::json),
        });
    }
    let view = s.view();
    let (conn_rate, bytes_rate) =
        prev.services
            .rates(s.name.clone(), (view.accepted, bytes_total), secs);
    let point = Point {
        active: view.active,
        conn_rate,
        bytes_rate,
    };
    let frame = ServiceFrame {
        listen: r.listen,
        listens: &r.listens,
        conn_rate,
        bytes_rate,
        fairness: jain(&fairness_input),
        replicas: c
            .replicas(&s.name)
            .map(|set| serde_json::to_value(set.replicas()).unwrap_or(Value::Null)),
        dns: r.watchers.iter().map(|w| w.view(&s.name)).collect(),
        docker_labels: r.label_watchers.iter().map(|w| w.view(&s.name)).collect(),
        backends,
        udp: is_udp.then(|| {
            let counts = udp.services.get(&s.name).copied().unwrap_or_default();
            counts.json()
        }),
        view,
    };
    (frame, (s.name.clone(), point, charted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 80))
    }

    fn point(x: u64) -> Point {
        Point {
            active: x,
            conn_rate: x as f64,
            bytes_rate: 2.0 * x as f64,
        }
    }

    /// Backends come and go for longer than the history lasts: the counters keep one frame's
    /// backends, the history at most `HISTORY` frames of `CHARTED` backends per service.
    #[test]
    fn memory_stays_bounded_as_backends_churn() {
        let mut counters: Counters<(Arc<str>, SocketAddr)> = Counters::default();
        let mut history = History::default();
        let names: Vec<Arc<str>> = ["web", "db", "cache"].iter().map(|&n| n.into()).collect();
        for f in 0..1_000u32 {
            let mut rates: Rates = Vec::new();
            // A service leaves after a while; 100 backends per service, a fresh set every frame.
            for name in names.iter().take(if f < 500 { 3 } else { 2 }) {
                let backends = (0..100)
                    .map(|i| {
                        let a = addr(f * 1000 + i);
                        let (c, _) = counters.rates((name.clone(), a), (f as u64, 0), 1.0);
                        assert_eq!(c, 0.0, "a new backend has no rate yet");
                        (a, point(i as u64))
                    })
                    .collect();
                rates.push((name.clone(), point(f as u64), backends));
            }
            counters.end_frame();
            history.push(f as u64, rates);
            let services = if f < 500 { 3 } else { 2 };
            assert_eq!(counters.before.len(), 100 * services, "frame {f}");
            assert!(counters.now.is_empty());
            assert!(counters.now.capacity() <= 2 * counters.before.len() + 64);
            assert!(history.at_ms.len() <= HISTORY);
            assert_eq!(history.services.len(), services);
            for c in &history.services {
                assert!(c.service.points.len() <= HISTORY);
                assert!(c.backends.len() <= CHARTED);
                assert!(
                    c.backends.iter().all(|b| b.points.len() == 1),
                    "fresh every frame"
                );
            }
        }
        assert_eq!(history.at_ms.len(), HISTORY);
        let frames = history.to_json();
        assert_eq!(frames.as_array().unwrap().len(), HISTORY);
        // The oldest frame kept is 700; the last frame lists the two services left and their
        // first CHARTED backends.
        assert_eq!(frames[0]["at_ms"], 700);
        let last = &frames[HISTORY - 1];
        assert_eq!(last["services"].as_array().unwrap().len(), 2);
        assert_eq!(
            last["services"][0]["backends"].as_array().unwrap().len(),
            CHARTED
        );
        assert_eq!(last["services"][0]["conn_rate"], 999.0);
    }

    /// A backend that stays keeps its series across frames, aligned with the frames' times, and
    /// its rates come from the counters one frame apart.
    #[test]
    fn steady_backends_keep_their_series_and_rates() {
        let mut counters: Counters<SocketAddr> = Counters::default();
        let mut history = History::default();
        let web: Arc<str> = "web".into();
        for f in 0..10u64 {
            let mut backends = Vec::new();
            // Backend 1 is there throughout; backend 2 joins at frame 5.
            for i in 1..=if f < 5 { 1 } else { 2 } {
                let (c, b) = counters.rates(addr(i), (10 * f, 100 * f), 2.0);
                let first = (i == 1 && f == 0) || (i == 2 && f == 5);
                assert_eq!((c, b), if first { (0.0, 0.0) } else { (5.0, 50.0) });
                backends.push((addr(i), point(f)));
            }
            counters.end_frame();
            history.push(1_000 + f, vec![(web.clone(), point(f), backends)]);
        }
        let frames = history.to_json();
        assert_eq!(frames.as_array().unwrap().len(), 10);
        assert_eq!(
            frames[4]["services"][0]["backends"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            frames[5]["services"][0]["backends"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(frames[9]["at_ms"], 1_009);
        assert_eq!(frames[9]["services"][0]["backends"][0]["active"], 9);
        assert_eq!(
            frames[9]["services"][0]["backends"][1]["address"],
            json!(addr(2))
        );
    }

    #[test]
    fn jain_index() {
        assert_eq!(jain(&[(0, 1), (0, 1)]), None);
        assert!((jain(&[(100, 1), (100, 1), (100, 1)]).unwrap() - 1.0).abs() < 1e-9);
        // 1:2:7 weights served exactly: fair.
        assert!((jain(&[(100, 1), (200, 2), (700, 7)]).unwrap() - 1.0).abs() < 1e-9);
        // everything on one of four: 1/4
        assert!((jain(&[(100, 1), (0, 1), (0, 1), (0, 1)]).unwrap() - 0.25).abs() < 1e-9);
    }
}
