//! A UDP service's counters and its backends', written by the sessions and loops through these
//! methods, and what `/metrics` exports of them ([`METRICS`], [`BACKEND_METRICS`]). Kept per service
//! name across reloads, like the service's own counters; a backend's as long as it is alive.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use crate::metrics::{Family, Kind, Samples, Subject, Table};
use crate::pool::Backend;
use crate::util::lock;

/// How a UDP session ended: the routing log's `end` and the `end` label of
/// `sluicegate_udp_sessions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// No datagram either way for `udp.idle_timeout`.
    IdleTimeout,
    /// Every client datagram had its `udp.responses`.
    Responses,
    /// It took its `udp.requests`, and they had their answers.
    Requests,
    /// The table was full (`udp.max_sessions`) and it was idle longest.
    Evicted,
    /// The backend answered with ICMP port-unreachable (or another error on its socket).
    BackendUnreachable,
    /// Health checks marked its backend down (`on_down: close`).
    BackendDown,
    /// Its backend left its source (`on_removed: close`, or its drain deadline passed).
    BackendRemoved,
    /// Still open at the drain deadline, or its service was removed.
    Shutdown,
    /// Ended by an operator (`DELETE /connections`).
    Killed,
}

impl End {
    pub(crate) const ALL: [End; 9] = [
        End::IdleTimeout,
        End::Responses,
        End::Requests,
        End::Evicted,
        End::BackendUnreachable,
        End::BackendDown,
        End::BackendRemoved,
        End::Shutdown,
        End::Killed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            End::IdleTimeout => "idle_timeout",
            End::Responses => "responses",
            End::Requests => "requests",
            End::Evicted => "evicted",
            End::BackendUnreachable => "backend_unreachable",
            End::BackendDown => "backend_down",
            End::BackendRemoved => "backend_removed",
            End::Shutdown => "shutdown",
            End::Killed => "killed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a datagram was dropped: the `reason` label of `sluicegate_udp_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// No backend was available for a new session (or a `per_packet` datagram).
    NoBackend,
    /// Larger than `udp.max_datagram`.
    TooLarge,
    /// A new session was refused: draining, `max_connections`, a per-source limit, allow/deny.
    Refused,
    /// The socket it was to leave by had no room (the kernel's send buffer full).
    QueueFull,
    /// Answers a session was still waiting for (`udp.responses`) when it was evicted.
    Evicted,
    /// A send failed with an error neither the backend's nor a full buffer's (the client gone, a
    /// local firewall).
    SendFailed,
    /// A new session's socket could not be opened (no descriptor, or no ephemeral port left):
    /// ours, not the backend's.
    NoSocket,
    /// On a shared address, no service's route takes it (its QUIC server name, or no default for
    /// a datagram that is not a QUIC Initial). Counted on the address's default service, else its
    /// first.
    NoRoute,
    /// On a shared address, a QUIC Initial whose ClientHello could not be read: malformed,
    /// undecryptable, or not whole within the wait's bounds. Counted as `no_route` is.
    QuicUnread,
}

impl Dropped {
    pub(crate) const ALL: [Dropped; 9] = [
        Dropped::NoBackend,
        Dropped::TooLarge,
        Dropped::Refused,
        Dropped::QueueFull,
        Dropped::Evicted,
        Dropped::SendFailed,
        Dropped::NoSocket,
        Dropped::NoRoute,
        Dropped::QuicUnread,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Dropped::NoBackend => "no_backend",
            Dropped::TooLarge => "too_large",
            Dropped::Refused => "refused",
            Dropped::QueueFull => "queue_full",
            Dropped::Evicted => "evicted",
            Dropped::SendFailed => "send_failed",
            Dropped::NoSocket => "no_socket",
            Dropped::NoRoute => "no_route",
            Dropped::QuicUnread => "quic_unread",
        }
    }
}

/// Which way a datagram went: `up`, client to backend, or `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Up,
    Down,
}

/// The counters of a UDP service, or of one of its backends: its sessions, its datagrams and
/// bytes each way, and the datagrams dropped.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    open: AtomicU64,
    ended: [AtomicU64; End::ALL.len()],
    datagrams: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: [AtomicU64; Dropped::ALL.len()],
}

impl Counts {
    fn opened(&self) {
        self.open.fetch_add(1, Relaxed);
    }

    fn ended(&self, end: End) {
        self.open.fetch_sub(1, Relaxed);
        self.ended[end.index()].fetch_add(1, Relaxed);
    }

    fn carried(&self, dir: Direction, len: usize) {
        self.datagrams[dir as usize].fetch_add(1, Relaxed);
        self.bytes[dir as usize].fetch_add(len as u64, Relaxed);
    }

    fn dropped_n(&self, why: Dropped, n: u64) {
        self.dropped[why as usize].fetch_add(n, Relaxed);
    }

    fn open_now(&self) -> u64 {
        self.open.load(Relaxed)
    }

    fn read(&self) -> CountsView {
        fn read<const N: usize>(a: &[AtomicU64; N]) -> [u64; N] {
            std::array::from_fn(|i| a[i].load(Relaxed))
        }
        CountsView {
            open: self.open_now(),
            ended: read(&self.ended),
            datagrams: read(&self.datagrams),
            bytes: read(&self.bytes),
            dropped: read(&self.dropped),
        }
    }
}

/// One UDP service's counters, and those of each backend its sessions went to.
#[derive(Debug, Default)]
pub(crate) struct UdpStats {
    counts: Counts,
    backends: Mutex<Backends>,
}

/// A service's per-backend counters, by address. Bounded by the backends alive: an entry none of
/// whose backend objects is alive any more (out of its pool, and no session holds one) is forgotten
/// when the table has doubled since it was last swept, and at every read of the views. While its
/// entry lives, a new backend object at the same address (a reload, discovery) carries on its
/// series; once forgotten, a backend back at that address starts from zero, as its other counters do.
#[derive(Debug, Default)]
struct Backends {
    by_addr: HashMap<SocketAddr, PerBackend>,
    /// The size at which an insert sweeps the gone ones first.
    sweep_at: usize,
}

/// Backend objects one address's entry keeps track of at most: the pool's current one and those
/// older sessions still hold (a session that followed a QUIC connection keeps its old backend).
const OBJECTS_PER_ADDRESS: usize = 4;

#[derive(Debug)]
struct PerBackend {
    /// The backend objects at this address its counters were of, the newest last.
    backends: Vec<Weak<Backend>>,
    counts: Arc<Counts>,
}

impl PerBackend {
    fn alive(&self) -> bool {
        self.backends.iter().any(|b| b.strong_count() > 0) || self.counts.open_now() > 0
    }

    /// Notes `backend` as one of this address's objects, forgetting the dead ones (and past
    /// [`OBJECTS_PER_ADDRESS`], the oldest).
    fn note(&mut self, backend: &Arc<Backend>) {
        if self
            .backends
            .iter()
            .any(|b| std::ptr::eq(b.as_ptr(), Arc::as_ptr(backend)))
        {
            return;
        }
        self.backends.retain(|b| b.strong_count() > 0);
        if self.backends.len() >= OBJECTS_PER_ADDRESS {
            self.backends.remove(0);
        }
        self.backends.push(Arc::downgrade(backend));
    }
}

impl Backends {
    fn sweep(&mut self) {
        self.by_addr.retain(|_, b| b.alive());
        self.sweep_at = 2 * self.by_addr.len() + 16;
    }
}

impl UdpStats {
    pub(crate) fn dropped(&self, why: Dropped) {
        self.dropped_n(why, 1);
    }

    pub(crate) fn dropped_n(&self, why: Dropped, n: usize) {
        self.counts.dropped_n(why, n as u64);
    }

    pub(crate) fn open_now(&self) -> u64 {
        self.counts.open_now()
    }

    /// Where what goes to and from `backend` is counted: this service's counters and that
    /// backend's.
    pub(crate) fn tally(self: &Arc<Self>, backend: &Arc<Backend>) -> Tally {
        let mut all = lock(&self.backends);
        if all.by_addr.len() >= all.sweep_at {
            all.sweep();
        }
        let entry = all
            .by_addr
            .entry(backend.addr)
            .or_insert_with(|| PerBackend {
                backends: Vec::new(),
                counts: Arc::default(),
            });
        entry.note(backend);
        Tally {
            service: self.clone(),
            backend: entry.counts.clone(),
        }
    }

    pub(crate) fn view(&self, service: Arc<str>) -> UdpView {
        UdpView {
            service,
            counts: self.counts.read(),
        }
    }

    /// Each backend's counters now, by address, the gone ones forgotten.
    pub(crate) fn backend_views(&self, service: &Arc<str>) -> Vec<UdpBackendView> {
        // Copied under the lock, read and written out after it: a session opening waits for no
        // formatting.
        let held: Vec<(SocketAddr, Arc<Counts>)> = {
            let mut all = lock(&self.backends);
            all.sweep();
            all.by_addr
                .iter()
                .map(|(addr, b)| (*addr, b.counts.clone()))
                .collect()
        };
        let mut v: Vec<UdpBackendView> = held
            .into_iter()
            .map(|(addr, counts)| UdpBackendView {
                service: service.clone(),
                backend: addr,
                address: addr.to_string(),
                counts: counts.read(),
            })
            .collect();
        v.sort_by_key(|b| b.backend);
        v
    }
}

/// Where a session's numbers go: its service's counters and its backend's, written together.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    service: Arc<UdpStats>,
    backend: Arc<Counts>,
}

impl Tally {
    pub(crate) fn opened(&self) {
        self.service.counts.opened();
        self.backend.opened();
    }

    pub(crate) fn ended(&self, end: End) {
        self.service.counts.ended(end);
        self.backend.ended(end);
    }

    /// A datagram of `len` payload bytes went `dir` (a PROXY header is not payload).
    pub(crate) fn carried(&self, dir: Direction, len: usize) {
        self.service.counts.carried(dir, len);
        self.backend.carried(dir, len);
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        self.service.counts.dropped_n(why, 1);
        self.backend.dropped_n(why, 1);
    }

    /// A session evicted with `unanswered` answers still to come: they will find no session.
    pub(crate) fn dropped_by_eviction(&self, unanswered: u64) {
        self.service.counts.dropped_n(Dropped::Evicted, unanswered);
        self.backend.dropped_n(Dropped::Evicted, unanswered);
    }
}

/// Every UDP service's counters, by name: a reload's new version of a service finds its own.
#[derive(Debug, Default)]
pub(crate) struct Registry(Mutex<HashMap<Arc<str>, Arc<UdpStats>>>);

impl Registry {
    pub(crate) fn of(&self, service: &Arc<str>) -> Arc<UdpStats> {
        lock(&self.0).entry(service.clone()).or_default().clone()
    }

    /// Forgets the services not in `keep` (removed by a reload) once their sessions are gone.
    pub(crate) fn retain(&self, keep: &[Arc<str>]) {
        lock(&self.0).retain(|name, s| keep.contains(name) || s.open_now() > 0);
    }

    fn all(&self) -> Vec<(Arc<str>, Arc<UdpStats>)> {
        let mut v: Vec<_> = lock(&self.0)
            .iter()
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(crate) fn views(&self) -> Vec<UdpView> {
        self.all()
            .into_iter()
            .map(|(name, s)| s.view(name))
            .collect()
    }

    /// Every UDP service's backends' counters, by service then address.
    pub(crate) fn backend_views(&self) -> Vec<UdpBackendView> {
        self.all()
            .into_iter()
            .flat_map(|(name, s)| s.backend_views(&name))
            .collect()
    }
}

/// Counters at one moment, indexed as [`End::ALL`], [`Direction`] and [`Dropped::ALL`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CountsView {
    pub(crate) open: u64,
    pub(crate) ended: [u64; End::ALL.len()],
    pub(crate) datagrams: [u64; 2],
    pub(crate) bytes: [u64; 2],
    pub(crate) dropped: [u64; Dropped::ALL.len()],
}

impl CountsView {
    /// The shape `/stats` shows: sessions open, by end; datagrams and bytes up and down; drops
    /// by reason (docs/admin-api.md).
    pub(crate) fn json(&self) -> serde_json::Value {
        let by = |names: &mut dyn Iterator<Item = &'static str>, v: &[u64]| {
            names
                .zip(v)
                .map(|(n, c)| (n.to_string(), serde_json::Value::from(*c)))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "sessions_open": self.open,
            "sessions_ended": by(&mut End::ALL.iter().map(|e| e.as_str()), &self.ended),
            "datagrams_up": self.datagrams[Direction::Up as usize],
            "datagrams_down": self.datagrams[Direction::Down as usize],
            "bytes_up": self.bytes[Direction::Up as usize],
            "bytes_down": self.bytes[Direction::Down as usize],
            "dropped": by(&mut Dropped::ALL.iter().map(|d| d.as_str()), &self.dropped),
        })
    }
}

/// A UDP service's counters at one moment.
#[derive(Debug, Clone)]
pub(crate) struct UdpView {
    pub(crate) service: Arc<str>,
    pub(crate) counts: CountsView,
}

impl Subject for UdpView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.service)
    }
}

/// A backend's counters, as a UDP service counted them, at one moment.
#[derive(Debug, Clone)]
pub(crate) struct UdpBackendView {
    pub(crate) service: Arc<str>,
    pub(crate) backend: SocketAddr,
    /// `backend` written out once, for its label.
    address: String,
    pub(crate) counts: CountsView,
}

impl Subject for UdpBackendView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        [&*self.service, self.address.as_str()].into_iter()
    }
}

const DIRECTIONS: [&str; 2] = ["up", "down"];

/// The reasons a datagram of a session with a backend can be dropped for: the others (no
/// backend, refused, no socket, no route, an unread QUIC Initial) come before any backend.
const BACKEND_DROPS: [Dropped; 4] = [
    Dropped::TooLarge,
    Dropped::QueueFull,
    Dropped::Evicted,
    Dropped::SendFailed,
];

fn put_ended(c: &CountsView, o: &mut Samples<'_>) {
    for e in End::ALL {
        o.put(&[e.as_str()], c.ended[e.index()]);
    }
}

fn put_datagrams(c: &CountsView, o: &mut Samples<'_>) {
    for (d, n) in DIRECTIONS.iter().zip(c.datagrams) {
        o.put(&[d], n);
    }
}

fn put_bytes(c: &CountsView, o: &mut Samples<'_>) {
    for (d, n) in DIRECTIONS.iter().zip(c.bytes) {
        o.put(&[d], n);
    }
}

fn put_dropped(c: &CountsView, reasons: &[Dropped], o: &mut Samples<'_>) {
    for r in reasons {
        o.put(&[r.as_str()], c.dropped[*r as usize]);
    }
}

/// What `/metrics` exports about each UDP service.
pub(crate) const METRICS: Table<UdpView> = Table {
    subject: &["service"],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_udp_sessions",
            "UDP sessions open now.",
            &[],
            |s, o| o.put(&[], s.counts.open),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_sessions_total",
            "UDP sessions by how they ended (the routing log's end values).",
            &["end"],
            |s, o| put_ended(&s.counts, o),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_datagrams_total",
            "Datagrams carried, by direction (up = client to backend).",
            &["direction"],
            |s, o| put_datagrams(&s.counts, o),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_bytes_total",
            "Payload bytes carried, by direction (a PROXY header is not counted).",
            &["direction"],
            |s, o| put_bytes(&s.counts, o),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_dropped_total",
            "Datagrams dropped, by reason.",
            &["reason"],
            |s, o| put_dropped(&s.counts, &Dropped::ALL, o),
        ),
    ],
};

/// What `/metrics` exports about each backend of a UDP service: the service's counters, per
/// backend, where they apply.
pub(crate) const BACKEND_METRICS: Table<UdpBackendView> = Table {
    subject: &["service", "backend"],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_udp_backend_sessions",
            "UDP sessions open now on the backend.",
            &[],
            |s, o| o.put(&[], s.counts.open),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_backend_sessions_total",
            "UDP sessions of the backend by how they ended.",
            &["end"],
            |s, o| put_ended(&s.counts, o),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_backend_datagrams_total",
            "Datagrams carried to (up) and from (down) the backend.",
            &["direction"],
            |s, o| put_datagrams(&s.counts, o),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_backend_bytes_total",
            "Payload bytes carried to (up) and from (down) the backend.",
            &["direction"],
            |s, o| put_bytes(&s.counts, o),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_backend_dropped_total",
            "Datagrams of the backend's sessions dropped, by reason.",
            &["reason"],
            |s, o| put_dropped(&s.counts, &BACKEND_DROPS, o),
        ),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Weight;

    fn backend(port: u16) -> Arc<Backend> {
        Arc::new(Backend::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Weight::ONE,
        ))
    }

    /// A session's numbers count for its service and its backend alike; each backend's apart.
    #[test]
    fn a_tally_counts_for_the_service_and_its_backend() {
        let stats = Arc::new(UdpStats::default());
        let (a, b) = (backend(1), backend(2));
        let (ta, tb) = (stats.tally(&a), stats.tally(&b));
        ta.opened();
        ta.carried(Direction::Up, 10);
        ta.carried(Direction::Down, 11);
        tb.opened();
        tb.carried(Direction::Up, 5);
        tb.dropped(Dropped::QueueFull);
        tb.ended(End::BackendUnreachable);
        stats.dropped(Dropped::NoBackend);
        let service = stats.view("s".into()).counts;
        assert_eq!(service.open, 1);
        assert_eq!(service.datagrams, [2, 1]);
        assert_eq!(service.bytes, [15, 11]);
        assert_eq!(service.dropped[Dropped::QueueFull as usize], 1);
        assert_eq!(service.dropped[Dropped::NoBackend as usize], 1);
        let views = stats.backend_views(&"s".into());
        let of = |port: u16| {
            let v = views
                .iter()
                .find(|v| v.backend.port() == port)
                .expect("listed");
            v.counts
        };
        assert_eq!(
            (of(1).open, of(1).datagrams, of(1).bytes),
            (1, [1, 1], [10, 11])
        );
        assert_eq!(of(2).open, 0);
        assert_eq!(of(2).ended[End::BackendUnreachable.index()], 1);
        assert_eq!(of(2).dropped[Dropped::QueueFull as usize], 1);
        assert_eq!(
            of(2).dropped[Dropped::NoBackend as usize],
            0,
            "not a backend's"
        );
    }

    /// The per-backend table holds the backends alive: one gone (out of its pool, no session
    /// holding it) is forgotten, and churning through many never grows it past twice the live
    /// ones; a backend back at its address carries on the same series while the entry lives.
    #[test]
    fn the_per_backend_table_forgets_the_backends_gone() {
        let stats = Arc::new(UdpStats::default());
        let kept = backend(1);
        stats.tally(&kept).carried(Direction::Up, 1);
        for port in 2..10_000 {
            let gone = backend(port);
            stats.tally(&gone).carried(Direction::Up, 1);
            assert!(lock(&stats.backends).by_addr.len() <= 2 * 2 + 16);
        }
        let views = stats.backend_views(&"s".into());
        assert_eq!(views.len(), 1, "only the live one is left");
        assert_eq!(views[0].counts.datagrams, [1, 0]);
        // A new backend object at the same address (a reload): the series goes on.
        let again = backend(1);
        drop(kept);
        stats.tally(&again).carried(Direction::Up, 1);
        let views = stats.backend_views(&"s".into());
        assert_eq!(views[0].counts.datagrams, [2, 0]);
        // A session still open on a backend gone from its pool keeps its entry.
        let held = stats.tally(&again);
        held.opened();
        drop(again);
        assert_eq!(stats.backend_views(&"s".into()).len(), 1);
        held.ended(End::IdleTimeout);
        assert!(stats.backend_views(&"s".into()).is_empty());
    }

    /// Two backend objects at one address (the pool's new one, and an old one a followed QUIC
    /// session still uses): the entry lives while either does, whichever was counted last.
    #[test]
    fn an_entry_lives_while_any_of_its_backend_objects_does() {
        let stats = Arc::new(UdpStats::default());
        let (old, new) = (backend(1), backend(1));
        stats.tally(&old).carried(Direction::Up, 1);
        stats.tally(&new).carried(Direction::Up, 1);
        stats.tally(&old).carried(Direction::Up, 1);
        drop(old);
        let views = stats.backend_views(&"s".into());
        assert_eq!(views.len(), 1, "the pool's backend is alive");
        assert_eq!(views[0].counts.datagrams, [3, 0]);
        drop(new);
        assert!(stats.backend_views(&"s".into()).is_empty());
    }
}
