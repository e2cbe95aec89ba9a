//! A UDP service's counters, written by the sessions and loops through these methods, and what
//! `/metrics` exports of them ([`METRICS`]). Kept per service name across reloads, like the
//! service's own counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::metrics::{Family, Kind, Subject, Table};
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

/// One UDP service's counters.
#[derive(Debug, Default)]
pub(crate) struct UdpStats {
    open: AtomicU64,
    ended: [AtomicU64; End::ALL.len()],
    datagrams: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: [AtomicU64; Dropped::ALL.len()],
}

impl UdpStats {
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Relaxed);
    }

    pub(crate) fn ended(&self, end: End) {
        self.open.fetch_sub(1, Relaxed);
        self.ended[end.index()].fetch_add(1, Relaxed);
    }

    /// A datagram of `len` payload bytes went `dir` (a PROXY header is not payload).
    pub(crate) fn carried(&self, dir: Direction, len: usize) {
        self.datagrams[dir as usize].fetch_add(1, Relaxed);
        self.bytes[dir as usize].fetch_add(len as u64, Relaxed);
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        self.dropped_n(why, 1);
    }

    pub(crate) fn dropped_n(&self, why: Dropped, n: usize) {
        self.dropped[why as usize].fetch_add(n as u64, Relaxed);
    }

    /// A session evicted with `unanswered` answers still to come: they will find no session.
    pub(crate) fn dropped_by_eviction(&self, unanswered: u64) {
        self.dropped[Dropped::Evicted as usize].fetch_add(unanswered, Relaxed);
    }

    pub(crate) fn open_now(&self) -> u64 {
        self.open.load(Relaxed)
    }

    pub(crate) fn view(&self, service: Arc<str>) -> UdpView {
        let read = |a: &[AtomicU64]| a.iter().map(|c| c.load(Relaxed)).collect::<Vec<_>>();
        UdpView {
            service,
            open: self.open_now(),
            ended: read(&self.ended),
            datagrams: read(&self.datagrams),
            bytes: read(&self.bytes),
            dropped: read(&self.dropped),
        }
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

    pub(crate) fn views(&self) -> Vec<UdpView> {
        let mut v: Vec<UdpView> = lock(&self.0)
            .iter()
            .map(|(name, s)| s.view(name.clone()))
            .collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }
}

/// A UDP service's counters at one moment.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct UdpView {
    pub(crate) service: Arc<str>,
    pub(crate) open: u64,
    pub(crate) ended: Vec<u64>,
    pub(crate) datagrams: Vec<u64>,
    pub(crate) bytes: Vec<u64>,
    pub(crate) dropped: Vec<u64>,
}

impl Subject for UdpView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.service)
    }
}

const DIRECTIONS: [&str; 2] = ["up", "down"];

/// What `/metrics` exports about each UDP service.
pub(crate) const METRICS: Table<UdpView> = Table {
    subject: &["service"],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_udp_sessions",
            "UDP sessions open now.",
            &[],
            |s, o| o.put(&[], s.open),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_sessions_total",
            "UDP sessions by how they ended (the routing log's end values).",
            &["end"],
            |s, o| {
                for e in End::ALL {
                    o.put(&[e.as_str()], s.ended.get(e.index()).copied().unwrap_or(0));
                }
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_datagrams_total",
            "Datagrams carried, by direction (up = client to backend).",
            &["direction"],
            |s, o| {
                for (i, d) in DIRECTIONS.iter().enumerate() {
                    o.put(&[d], s.datagrams.get(i).copied().unwrap_or(0));
                }
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_bytes_total",
            "Payload bytes carried, by direction (a PROXY header is not counted).",
            &["direction"],
            |s, o| {
                for (i, d) in DIRECTIONS.iter().enumerate() {
                    o.put(&[d], s.bytes.get(i).copied().unwrap_or(0));
                }
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_udp_dropped_total",
            "Datagrams dropped, by reason.",
            &["reason"],
            |s, o| {
                for (i, r) in Dropped::ALL.iter().enumerate() {
                    o.put(&[r.as_str()], s.dropped.get(i).copied().unwrap_or(0));
                }
            },
        ),
    ],
};
