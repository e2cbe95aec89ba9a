//! The loop of one UDP listen address: reads the clients' datagrams in batches, finds or starts
//! each one's session (admission, the pick, the backend socket, the table's bound), and sends the
//! datagram on from the session's socket. `per_packet` services have no sessions: each datagram is
//! balanced on its own. Everything here is synchronous between two batches; the sessions' own
//! tasks carry the answers back ([`super::session`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::exchange::{Exchange, Up};
use super::session::{self, Live, Slots, Task};
use super::socket::{self, Bufs, Listening, Received};
use super::stats::{Direction, Dropped, End, UdpStats};
use super::table::Table;
use crate::admission::Gate;
use crate::config::MAX_UDP_PAYLOAD;
use crate::pool::{ActiveGuard, Backend};
use crate::service::Service;
use crate::util::{is_local_exhaustion, lock, RateLimited};

/// What one listen address's loop runs with.
pub(crate) struct Loop {
    pub(crate) listening: Arc<Listening>,
    /// The service's current version (a reload swaps it; open sessions keep theirs).
    pub(crate) service: Arc<ArcSwap<Service>>,
    pub(crate) stats: Arc<UdpStats>,
    pub(crate) gate: Arc<Gate>,
    /// Every session's task, for the drain.
    pub(crate) tracker: TaskTracker,
    /// Set once the drain begins: new sessions are refused, open ones go on.
    pub(crate) draining: CancellationToken,
    /// Ends every open session (`shutdown`): the drain deadline.
    pub(crate) deadline: CancellationToken,
    /// Ends the loop (its service or address is gone, or the process is done); its open sessions
    /// end with it.
    pub(crate) stop: CancellationToken,
    /// Ends the loop only: an upgrade's new process reads the socket now, and the open sessions
    /// go on answering from it until they end.
    pub(crate) pause: CancellationToken,
}

/// The loop's state between batches.
struct State {
    table: Table<Arc<Live>>,
    epoch: Instant,
    gone_tx: tokio::sync::mpsc::UnboundedSender<u64>,
    /// Ends this loop's sessions: the drain deadline, or the loop's own end.
    shutdown: CancellationToken,
    /// `per_packet` sends leave from an unconnected socket per address family.
    unconnected: [Option<std::net::UdpSocket>; 2],
    /// The PROXY header and the payload, put together for one send.
    scratch: Vec<u8>,
    errors: RateLimited,
}

/// Runs until `stop`.
pub(crate) async fn serve(l: Loop) {
    let max_sessions = l.service.load().udp.max_sessions as usize;
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut st = State {
        table: Table::new(max_sessions),
        epoch: Instant::now(),
        gone_tx,
        shutdown: l.deadline.child_token(),
        unconnected: [None, None],
        scratch: Vec::new(),
        errors: RateLimited::new(std::time::Duration::from_secs(1)),
    };
    let mut bufs = Bufs::new();
    loop {
        tokio::select! {
            biased;
            () = l.stop.cancelled() => break,
            () = l.pause.cancelled() => return,
            Some(id) = gone_rx.recv() => {
                st.table.remove(id);
            }
            r = l.listening.recv_batch(&mut bufs, |d| st.datagram(&l, d)) => {
                if let Err(e) = r {
                    if st.errors.allow().is_some() {
                        tracing::warn!(listen = %l.listening.local, error = %e, "receiving datagrams failed");
                    }
                    if is_local_exhaustion(&e) {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }
    st.shutdown.cancel();
}

impl State {
    /// One client datagram.
    fn datagram(&mut self, l: &Loop, d: Received<'_>) {
        let service = l.service.load();
        let settings = service.udp;
        if d.bytes.len() > settings.max_datagram as usize {
            l.stats.dropped(Dropped::TooLarge);
            return;
        }
        if settings.per_packet {
            return self.per_packet(l, &service, d);
        }
        let key = (d.from, d.to);
        let mut avoid = None;
        if let Some((id, live)) = self.table.get(&key) {
            let live = live.clone();
            if !live.ended() && self.up(l, id, &live, d, &service) {
                return;
            }
            // Ended (its task not heard from yet), or its backend's port was just found closed:
            // this datagram starts a new session, elsewhere if the port was closed.
            if live.end_reason() == Some(End::BackendUnreachable) {
                avoid = Some(live.backend.addr);
            }
            self.table.remove(id);
        }
        let Some((id, live)) = self.start(l, &service, d, avoid) else {
            return;
        };
        // A new session's first send fails only on our side; the datagram is lost then.
        let _ = self.up(l, id, &live, d, &service);
    }

    /// Sends a client datagram on its session's socket: `false` when the backend's port was
    /// found closed (an ICMP port-unreachable came back for an earlier one), which ends the
    /// session without taking the datagram.
    fn up(
        &mut self,
        l: &Loop,
        id: u64,
        live: &Arc<Live>,
        d: Received<'_>,
        service: &Service,
    ) -> bool {
        let Some(bytes) = framed(&mut self.scratch, service, d) else {
            l.stats.dropped(Dropped::TooLarge);
            return true;
        };
        let sent = socket::try_send(&live.socket, bytes);
        match sent {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                l.stats.dropped(Dropped::QueueFull);
                return true;
            }
            Err(e) if session::unreachable(&e) => {
                // An ICMP unreachable came back for an earlier datagram.
                tracing::debug!(error = %e, backend = %live.backend.addr, "the backend is unreachable");
                live.end(End::BackendUnreachable);
                self.table.detach(id);
                return false;
            }
            Err(e) => {
                // Ours (no buffer, a local firewall, too large for the path): not the backend's.
                tracing::debug!(error = %e, "sending to the backend failed");
                let why = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                    Dropped::TooLarge
                } else {
                    Dropped::SendFailed
                };
                l.stats.dropped(why);
                return true;
            }
        }
        live.touch();
        l.stats.carried(Direction::Up, d.bytes.len());
        live.carried(Direction::Up, d.bytes.len());
        let verdict = lock(&live.exchange).up();
        match verdict {
            Up::Open => {}
            Up::Last => self.table.detach(id),
            Up::Done => {
                live.end(End::Responses);
                self.table.detach(id);
            }
        }
        true
    }

    /// Starts a session for a client datagram, or says (and counts) why not.
    fn start(
        &mut self,
        l: &Loop,
        service: &Arc<Service>,
        d: Received<'_>,
        avoid: Option<SocketAddr>,
    ) -> Option<(u64, Arc<Live>)> {
        let refuse = |why: Dropped| {
            tracing::debug!(client = %d.from, reason = why.as_str(), "datagram dropped: no session for it");
            l.stats.dropped(why);
            None
        };
        if l.draining.is_cancelled() {
            return refuse(Dropped::Refused);
        }
        // At a cap (the top-level or the service's `max_connections`), the session idle longest
        // on this address makes room, as when the table is full: a flood of sources cannot lock
        // new clients out for an idle timeout.
        let mut room = || -> bool {
            match self.table.evict(|v: &Arc<Live>| v.last_active()) {
                Some(old) => {
                    l.stats
                        .dropped_by_eviction(lock(&old.exchange).unanswered());
                    old.end(End::Evicted);
                    true
                }
                None => false,
            }
        };
        let gate = match l.gate.enter() {
            Some(g) => g,
            None if room() => match l.gate.enter() {
                Some(g) => g,
                None => return refuse(Dropped::Refused),
            },
            None => return refuse(Dropped::Refused),
        };
        let cap = service.max_connections;
        let entered = service.stats.enter(cap) || (room() && service.stats.enter(cap));
        if !entered {
            return refuse(Dropped::Refused);
        }
        let source = match crate::session::admit_source(service, d.from.ip()) {
            Ok(s) => s,
            Err(_) => {
                service.stats.left();
                return refuse(Dropped::Refused);
            }
        };
        let picked = pick(service, d.from, avoid);
        let Some((backend, active)) = picked else {
            service.stats.left();
            service.note_selection(false);
            return refuse(Dropped::NoBackend);
        };
        service.note_selection(true);
        let socket = match socket::connect(backend.addr) {
            Ok(s) => s,
            Err(e) => {
                service.stats.left();
                if !is_local_exhaustion(&e) {
                    service.pool.connect_failed(&backend);
                }
                if self.errors.allow().is_some() {
                    tracing::warn!(backend = %backend.addr, error = %e, "cannot open a socket to the backend");
                }
                return refuse(Dropped::NoBackend);
            }
        };
        service.stats.accepted();
        service.pool.session_opened(&backend);
        let settings = service.udp;
        let slots = Slots {
            active,
            _source: source,
            service: service.clone(),
            _gate: gate,
            since: service.occupancy.sessions.enter(),
        };
        let live = Arc::new(Live::new(
            socket,
            (d.from, d.to),
            Exchange::new(settings.responses, settings.requests),
            slots,
            self.epoch,
        ));
        let now = self.epoch.elapsed().as_millis() as u64;
        self.table.set_max(settings.max_sessions as usize);
        let (id, evicted) = self
            .table
            .insert((d.from, d.to), live.clone(), now, |v| v.last_active());
        if let Some(old) = evicted {
            l.stats
                .dropped_by_eviction(lock(&old.exchange).unanswered());
            old.end(End::Evicted);
        }
        l.stats.opened();
        self.spawn(l, service, &live, id);
        Some((id, live))
    }

    /// Starts a new session's task, in its own span.
    fn spawn(&self, l: &Loop, service: &Arc<Service>, live: &Arc<Live>, id: u64) {
        let settings = service.udp;
        let backend = &live.backend;
        let span = tracing::info_span!(
            "udp",
            service = %service.name,
            client = %live.client,
            listen = %live.to,
            backend = %backend.addr,
        );
        let task = Task {
            live: live.clone(),
            service: service.clone(),
            cut: backend.cut_signal(),
            listening: l.listening.clone(),
            stats: l.stats.clone(),
            idle: settings.idle_timeout.0,
            max_datagram: settings.max_datagram as usize,
            shutdown: self.shutdown.clone(),
            gone: self.gone_tx.clone(),
            id,
            started: Instant::now(),
        };
        l.tracker.spawn(session::run(task).instrument(span));
    }

    /// A `per_packet` datagram: balanced on its own, sent from an unconnected socket, no answer
    /// expected.
    fn per_packet(&mut self, l: &Loop, service: &Arc<Service>, d: Received<'_>) {
        if l.draining.is_cancelled() {
            return l.stats.dropped(Dropped::Refused);
        }
        if !service.limits.permits(d.from.ip()) {
            return l.stats.dropped(Dropped::Refused);
        }
        let snapshot = service.pool.snapshot();
        let Some(backend) = snapshot.pick(d.from, &[]) else {
            service.note_selection(false);
            return l.stats.dropped(Dropped::NoBackend);
        };
        service.note_selection(true);
        let family = usize::from(backend.addr.is_ipv6());
        if self.unconnected[family].is_none() {
            match socket::unconnected(backend.addr) {
                Ok(s) => self.unconnected[family] = Some(s),
                Err(e) => {
                    if self.errors.allow().is_some() {
                        tracing::warn!(error = %e, "cannot open a socket to the backends");
                    }
                    return l.stats.dropped(Dropped::NoBackend);
                }
            }
        }
        let Some(out) = &self.unconnected[family] else {
            return;
        };
        let Some(bytes) = framed(&mut self.scratch, service, d) else {
            return l.stats.dropped(Dropped::TooLarge);
        };
        match out.send_to(bytes, backend.addr) {
            Ok(_) => {
                l.stats.carried(Direction::Up, d.bytes.len());
                backend.stats.moved(d.bytes.len() as u64, 0);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => l.stats.dropped(Dropped::QueueFull),
            Err(e) => {
                tracing::debug!(error = %e, backend = %backend.addr, "per-packet send failed");
                l.stats.dropped(Dropped::SendFailed);
            }
        }
    }
}

/// What goes to the backend for datagram `d`: with `proxy_protocol`, a PROXY v2 header then the
/// payload, put together in `scratch`; `None` when the header takes it past what UDP carries (too
/// large, not a failure of the backend's).
fn framed<'a>(scratch: &'a mut Vec<u8>, service: &Service, d: Received<'a>) -> Option<&'a [u8]> {
    if service.proxy_protocol.is_none() {
        return Some(d.bytes);
    }
    scratch.clear();
    scratch.extend_from_slice(&crate::proxy_protocol::encode_dgram(d.from, d.to));
    scratch.extend_from_slice(d.bytes);
    (scratch.len() <= MAX_UDP_PAYLOAD as usize).then_some(&scratch[..])
}

/// A backend for a new session, below its cap, not `avoid` (whose port was just found closed)
/// unless it is the only one.
fn pick(
    service: &Service,
    client: SocketAddr,
    avoid: Option<SocketAddr>,
) -> Option<(Arc<Backend>, ActiveGuard)> {
    let snapshot = service.pool.snapshot();
    let mut tried: Vec<SocketAddr> = avoid.into_iter().collect();
    for _ in 0..8 {
        let b = match snapshot.pick(client, &tried) {
            Some(b) => b.clone(),
            // Only the avoided one is left: better it than nothing.
            None if avoid.is_some() && tried.len() == 1 => {
                tried.clear();
                continue;
            }
            None => return None,
        };
        match ActiveGuard::within(b.clone(), service.caps.cap_of(&b)) {
            Some(active) => return Some((b, active)),
            None => tried.push(b.addr),
        }
    }
    None
}
