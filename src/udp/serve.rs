//! The loop of one UDP listen address: reads the clients' datagrams in batches, finds or starts
//! each one's session (admission, the pick, the backend socket, the table's bound), and sends the
//! datagram on from the session's socket: an open session's datagrams of one batch are gathered
//! ([`super::outbox`]) and sent when the batch has been read, together where GSO allows.
//! `per_packet` services have no sessions: each datagram is balanced on its own. Everything here is
//! synchronous between two batches; the sessions' own tasks carry the answers back
//! ([`super::session`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use std::sync::Mutex;

use super::exchange::{Exchange, Up};
use super::follow::Cids;
use super::gso;
use super::outbox::{Outbox, Run};
use super::pending::{self, Pending};
use super::quic::{self, PacketType};
use super::session::{self, Live, Parts, QuicInfo, Slots, Task};
use super::socket::{self, Bufs, Listening, Received};
use super::stats::{Direction, Dropped, End};
use super::table::Table;
use super::{Routes, Target};
use crate::admission::{Gate, GateSlot, SourceSlot};
use crate::config::MAX_UDP_PAYLOAD;
use crate::connections::{self, Opened, Protocol};
use crate::pool::{ActiveGuard, Backend};
use crate::service::Service;
use crate::tls::ClientHello;
use crate::util::{is_local_exhaustion, lock, RateLimited};

/// What one listen address's loop runs with.
pub(crate) struct Loop {
    pub(crate) listening: Arc<Listening>,
    /// The address's services (a reload swaps them; open sessions keep the version they began
    /// with).
    pub(crate) routes: Arc<ArcSwap<Routes>>,
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
    /// The batch's datagrams for open sessions, sent when it has been read.
    outbox: Outbox<Arc<Live>>,
    /// QUIC clients of a shared address waiting for their hello to be whole.
    pending: Pending,
    /// QUIC connection IDs to their sessions (the sessions record the backend's).
    cids: Arc<Mutex<Cids>>,
    errors: RateLimited,
    /// The last address a client sent to, written once for the listings of the sessions that
    /// reach it (a wildcard bind has several).
    listen: Option<(SocketAddr, Arc<str>)>,
}

/// Connection IDs recorded per session of the table's bound, at most.
const CIDS_PER_SESSION_BOUND: usize = 2;

/// Runs until `stop`.
pub(crate) async fn serve(l: Loop) {
    let max_sessions = max_sessions(&l.routes.load());
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut st = State {
        table: Table::new(max_sessions),
        epoch: Instant::now(),
        gone_tx,
        shutdown: l.deadline.child_token(),
        unconnected: [None, None],
        scratch: Vec::new(),
        outbox: Outbox::default(),
        pending: Pending::default(),
        cids: Arc::new(Mutex::new(Cids::new(max_sessions * CIDS_PER_SESSION_BOUND))),
        errors: RateLimited::new(std::time::Duration::from_secs(1)),
        listen: None,
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
            r = l.listening.recv_batch(&mut bufs, |d| st.datagram(&l, d, true)) => {
                st.flush(&l);
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

/// The bound of an address's session table: the largest `max_sessions` of its services.
fn max_sessions(routes: &Routes) -> usize {
    routes
        .table
        .targets()
        .map(|t| t.service.load().udp.max_sessions as usize)
        .max()
        .unwrap_or(1)
}

/// Where a client datagram with no session goes.
enum Routed<'r> {
    /// A new session of `target`'s service, which these datagrams (held while its hello was read,
    /// this one last) start.
    New {
        target: &'r Target,
        quic: Option<QuicInfo>,
        held: Option<Vec<Box<[u8]>>>,
    },
    /// A connection known by its ID, from a new client address: a new session on its backend,
    /// of its service (still on this address).
    Follow(Arc<Live>, &'r Target),
    /// Held until the client's hello is whole.
    Held,
    /// Dropped, `n` datagrams (this one and any held before it), counted.
    Dropped(Dropped, usize),
}

impl State {
    /// One client datagram. `batch`: an open session's may wait for the end of the batch
    /// ([`State::flush`]), when no datagram's count changes where the next one goes.
    fn datagram(&mut self, l: &Loop, d: Received<'_>, batch: bool) {
        let key = (d.from, d.to);
        if let Some((id, live)) = self.table.get(&key) {
            let live = live.clone();
            if d.bytes.len() > live.service.udp.max_datagram as usize {
                return live.stats.dropped(Dropped::TooLarge);
            }
            if live.ended() && !self.outbox.is_empty() {
                // Its datagrams gathered before this one go first (to a new session), and this
                // one after them, to wherever they went.
                self.flush(l);
                return self.datagram(l, d, batch);
            }
            if !live.ended() {
                if batch && lock(&live.exchange).always_open() {
                    return self.gather(id, &live, d);
                }
                if self.up(id, &live, d) {
                    return;
                }
            }
            return self.replace(l, id, &live, d);
        }
        self.unheld(l, d, None);
    }

    /// A datagram whose session has ended (its task not heard from yet), or whose backend's
    /// port was just found closed: it starts a new session, elsewhere if the port was closed.
    fn replace(&mut self, l: &Loop, id: u64, live: &Live, d: Received<'_>) {
        let avoid =
            (live.end_reason() == Some(End::BackendUnreachable)).then_some(live.backend.addr);
        self.table.remove(id);
        self.unheld(l, d, avoid);
    }

    /// A datagram no session holds: a new session's, unless it is dropped.
    fn unheld(&mut self, l: &Loop, d: Received<'_>, avoid: Option<SocketAddr>) {
        let routes = l.routes.load();
        if d.bytes.len() > routes.max_datagram() {
            return count(&routes, Dropped::TooLarge, 1);
        }
        if let Some(only) = routes.only() {
            let service = only.service.load();
            if service.udp.per_packet {
                return self.per_packet(l, only, &service, d);
            }
        }
        match self.route(&routes, d) {
            Routed::New { target, quic, held } => {
                let service = target.service.load_full();
                let n = held.as_ref().map_or(1, Vec::len);
                let max = service.udp.max_datagram as usize;
                let too_large = match &held {
                    Some(held) => held.iter().any(|h| h.len() > max),
                    None => d.bytes.len() > max,
                };
                if too_large {
                    return target.stats.dropped_n(Dropped::TooLarge, n);
                }
                let shared = routes.only().is_none();
                let how = Pick::Avoiding(avoid);
                let opened = self.open(l, &service, target, d, how, quic, shared);
                let (id, live) = match opened {
                    Ok(opened) => opened,
                    Err(why) => return target.stats.dropped_n(why, n),
                };
                match held {
                    Some(held) => {
                        for datagram in held {
                            let _ = self.up(
                                id,
                                &live,
                                Received {
                                    bytes: &datagram,
                                    ..d
                                },
                            );
                        }
                    }
                    // A new session's first send fails only on our side; the datagram is lost then.
                    None => {
                        let _ = self.up(id, &live, d);
                    }
                }
            }
            Routed::Follow(old, target) => self.follow(l, &old, target, d),
            Routed::Held => {}
            Routed::Dropped(why, n) => count(&routes, why, n),
        }
    }

    /// Where a datagram that has no session goes: the address's one service, or on a QUIC
    /// address the session whose connection ID it carries, else the route its ClientHello's
    /// server name and protocols choose (held until the hello is whole), else the default.
    fn route<'r>(&mut self, routes: &'r Routes, d: Received<'_>) -> Routed<'r> {
        if routes.quic {
            let cids = lock(&self.cids);
            if let Some((id, _)) = cids.find(d.bytes) {
                let live = self.table.by_id(id).filter(|s| !s.ended());
                // Followed only while its service is still on this address.
                let target = live.and_then(|s| routes.target_of(&s.service.name));
                if let (Some(live), Some(target)) = (live, target) {
                    return Routed::Follow(live.clone(), target);
                }
            }
        }
        let header = routes
            .quic
            .then(|| quic::parse_long_header(d.bytes).ok())
            .flatten();
        if let Some(only) = routes.only() {
            // Clients left waiting by a reload that made the address one service's.
            let expired = self.pending.clear();
            if expired > 0 {
                count(routes, Dropped::QuicUnread, expired);
            }
            let quic = routes.quic.then(|| QuicInfo {
                version: header.map(|h| h.version),
                ..QuicInfo::default()
            });
            return Routed::New {
                target: only,
                quic,
                held: None,
            };
        }
        // A 0-RTT or Handshake packet of a connection not seen: its Initial was lost or comes
        // later, and routed without its name it would pin the connection to the default route.
        if header.is_some_and(|h| h.packet_type != PacketType::Initial) {
            return Routed::Dropped(Dropped::QuicUnread, 1);
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let (expired, read) = self.pending.push((d.from, d.to), d.bytes, now);
        if expired > 0 {
            count(routes, Dropped::QuicUnread, expired);
        }
        let (hello, version, held) = match read {
            pending::Read::Held => return Routed::Held,
            pending::Read::Unread { error, dropped } => {
                tracing::debug!(client = %d.from, error = ?error, "a QUIC Initial that cannot be read");
                return Routed::Dropped(Dropped::QuicUnread, dropped + 1);
            }
            pending::Read::NotInitial => (ClientHello::default(), None, None),
            pending::Read::Hello {
                hello,
                version,
                held,
            } => (hello, Some(version), Some(held)),
        };
        let n = held.as_ref().map_or(1, Vec::len);
        let Some(chosen) = routes.table.choose(hello.sni.as_deref(), &hello.alpn) else {
            return Routed::Dropped(Dropped::NoRoute, n);
        };
        let alpn = chosen.protocol.or(hello.alpn.first().map(Vec::as_slice));
        let alpn = alpn.map(|p| String::from_utf8_lossy(p).into_owned());
        let why = chosen.why.as_str();
        // The choice borrows the hello's protocols too; the target is the table's own.
        let chosen = chosen.target as *const Target;
        let Some(target) = routes.table.targets().find(|t| std::ptr::eq(*t, chosen)) else {
            return Routed::Dropped(Dropped::NoRoute, n);
        };
        let quic = QuicInfo {
            version,
            alpn,
            sni: hello.sni,
            route: Some(why),
        };
        Routed::New {
            target,
            quic: Some(quic),
            held,
        }
    }

    /// Sends a client datagram on its session's socket: `false` when the backend's port was
    /// found closed (an ICMP port-unreachable came back for an earlier one), which ends the
    /// session without taking the datagram.
    fn up(&mut self, id: u64, live: &Arc<Live>, d: Received<'_>) -> bool {
        let Some(bytes) = framed(&mut self.scratch, &live.service, d) else {
            live.stats.dropped(Dropped::TooLarge);
            return true;
        };
        match socket::try_send(&live.socket, bytes) {
            Ok(_) => self.sent_up(id, live, d.bytes.len()),
            Err(e) => {
                if !send_failed(live, &e) {
                    self.table.detach(id);
                    return false;
                }
            }
        }
        true
    }

    /// Gathers a client datagram for its session's send at the end of the batch.
    fn gather(&mut self, id: u64, live: &Arc<Live>, d: Received<'_>) {
        let header = live
            .service
            .proxy_protocol
            .is_some()
            .then(|| crate::proxy_protocol::encode_dgram(d.from, d.to));
        let header = header.as_deref().unwrap_or_default();
        if header.len() + d.bytes.len() > MAX_UDP_PAYLOAD as usize {
            return live.stats.dropped(Dropped::TooLarge);
        }
        self.outbox.run(id, live).push(header, d.bytes);
    }

    /// Sends the batch's gathered datagrams, each session's in as few sends as GSO allows.
    fn flush(&mut self, l: &Loop) {
        if self.outbox.is_empty() {
            return;
        }
        // Taken out while sent: a datagram sent again on a new session goes at once, not here.
        let mut outbox = std::mem::take(&mut self.outbox);
        for run in outbox.runs() {
            self.send_run(l, run);
        }
        outbox.clear();
        self.outbox = outbox;
    }

    /// One session's datagrams of the batch. Those its session can no longer take (it ended
    /// meanwhile, or its backend's port was found closed) go as any datagram does then, to a new
    /// session.
    fn send_run(&mut self, l: &Loop, run: &Run<Arc<Live>>) {
        let Some(live) = &run.session else {
            return;
        };
        let mut rest = live.ended().then_some(0);
        if rest.is_none() {
            let limits = (
                l.listening.max_segments(Direction::Up),
                gso::max_segment(live.backend.addr.is_ipv6()),
            );
            gso::send(
                &run.bytes,
                &run.sizes,
                limits,
                |bytes, segment| {
                    l.listening
                        .try_send_up(&live.socket, live.backend.addr, bytes, segment)
                },
                |k, sent| {
                    match sent {
                        Ok(()) => self.sent_up(run.id, live, run.payloads[k]),
                        Err(e) => {
                            if !send_failed(live, e) {
                                rest = Some(k);
                                return false;
                            }
                        }
                    }
                    true
                },
            );
        }
        let Some(first) = rest else {
            return;
        };
        for k in first..run.sizes.len() {
            let d = Received {
                from: live.client,
                to: live.to,
                bytes: run.payload(k),
            };
            if k == first {
                self.replace(l, run.id, live, d);
            } else {
                self.datagram(l, d, false);
            }
        }
    }

    /// A client datagram of `len` bytes went to the backend: counted, and what its session's
    /// count says of the next.
    fn sent_up(&mut self, id: u64, live: &Live, len: usize) {
        live.touch();
        live.carried(Direction::Up, len);
        let verdict = lock(&live.exchange).up();
        match verdict {
            Up::Open => {}
            Up::Last => self.table.detach(id),
            Up::Done => {
                live.end(End::Responses);
                self.table.detach(id);
            }
        }
    }

    /// A known connection from a new client address (NAT rebinding): a new session on the same
    /// backend, of the same service version, which takes over the connection's IDs.
    fn follow(&mut self, l: &Loop, old: &Arc<Live>, target: &Target, d: Received<'_>) {
        let service = old.service.clone();
        let quic = old.quic.clone();
        let how = Pick::Backend(old.backend.clone());
        let (id, live) = match self.open(l, &service, target, d, how, quic, true) {
            Ok(opened) => opened,
            Err(why) => return target.stats.dropped(why),
        };
        tracing::debug!(client = %d.from, was = %old.client, backend = %live.backend.addr, "a QUIC connection moved to a new client address");
        let cids: Vec<Box<[u8]>> = lock(&old.cids).clone();
        for cid in cids {
            live.record_cid(&self.cids, id, &cid);
        }
        let _ = self.up(id, &live, d);
    }

    /// Opens a session of `target`'s service (the version `service`): admission, the backend,
    /// its socket, its place in the table, its task; or why not (the caller counts it). On a
    /// `shared` address the service's cap makes no room by ending another service's session.
    /// `to` written for a session's listing: made once per address the clients send to.
    fn listen_name(&mut self, to: SocketAddr) -> Arc<str> {
        match &self.listen {
            Some((at, name)) if *at == to => name.clone(),
            _ => {
                let name: Arc<str> = to.to_string().into();
                self.listen = Some((to, name.clone()));
                name
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        l: &Loop,
        service: &Arc<Service>,
        target: &Target,
        d: Received<'_>,
        how: Pick,
        quic: Option<QuicInfo>,
        shared: bool,
    ) -> Result<(u64, Arc<Live>), Dropped> {
        // The batch's gathered datagrams go first: making room may end their sessions.
        self.flush(l);
        let refuse = |why: Dropped| {
            tracing::debug!(client = %d.from, reason = why.as_str(), "datagram dropped: no session for it");
            Err(why)
        };
        if l.draining.is_cancelled() {
            return refuse(Dropped::Refused);
        }
        let Some(admitted) = self.admit(l, service, d, shared) else {
            return refuse(Dropped::Refused);
        };
        let picked = match how {
            Pick::Avoiding(avoid) => pick(service, d.from, avoid),
            Pick::Backend(b) => {
                let cap = service.caps.cap_of(&b);
                ActiveGuard::within(b.clone(), cap).map(|active| (b, active))
            }
        };
        let Some((backend, active)) = picked else {
            service.stats.left();
            service.note_selection(false);
            return refuse(Dropped::NoBackend);
        };
        service.note_selection(true);
        // Opening a UDP socket sends nothing: its failures are ours (no descriptor, no ephemeral
        // port left: EADDRINUSE), never the backend's, which must not be ejected for them.
        let socket = match socket::connect(backend.addr) {
            Ok(s) => s,
            Err(e) => {
                service.stats.left();
                if self.errors.allow().is_some() {
                    tracing::warn!(backend = %backend.addr, error = %e, "cannot open a session's socket to the backend");
                }
                return refuse(Dropped::NoSocket);
            }
        };
        service.stats.accepted();
        service.pool.session_opened(&backend);
        let settings = service.udp;
        let (gate, source) = admitted;
        let listed = connections::registry().enter(Opened {
            protocol: Protocol::Udp,
            service: service.name.clone(),
            client: d.from,
            listen: self.listen_name(d.to),
            engine: "udp",
            handed_over: None,
        });
        listed
            .conn()
            .active()
            .store(crate::relay::stamp(), std::sync::atomic::Ordering::Relaxed);
        let slots = Slots {
            active,
            _source: source,
            service: service.clone(),
            _gate: gate,
            since: service.occupancy.sessions.enter(),
            listed,
        };
        let parts = Parts {
            socket,
            key: (d.from, d.to),
            exchange: Exchange::new(settings.responses, settings.requests),
            slots,
            stats: target.stats.clone(),
            quic,
            leave: target.leave.clone(),
        };
        let live = Arc::new(Live::new(parts, self.epoch));
        live.list();
        let now = self.epoch.elapsed().as_millis() as u64;
        let max = max_sessions(&l.routes.load());
        self.table.set_max(max);
        lock(&self.cids).set_max(max * CIDS_PER_SESSION_BOUND);
        let (id, evicted) = self
            .table
            .insert((d.from, d.to), live.clone(), now, |v| v.last_active());
        if let Some(old) = evicted {
            old.stats
                .dropped_by_eviction(lock(&old.exchange).unanswered());
            old.end(End::Evicted);
        }
        live.stats.opened();
        self.spawn(l, &live, id);
        Ok((id, live))
    }

    /// A new session's places: under the top-level cap, in its service, under its source's
    /// limits; `None` (counted by the caller) when refused. At a cap (the top-level or the
    /// service's `max_connections`), the session idle longest on this address makes room, as when
    /// the table is full: a flood of sources cannot lock new clients out for an idle timeout.
    fn admit(
        &mut self,
        l: &Loop,
        service: &Service,
        d: Received<'_>,
        shared: bool,
    ) -> Option<(GateSlot, Option<SourceSlot>)> {
        let table = &mut self.table;
        let mut room = || -> bool {
            match table.evict(|v: &Arc<Live>| v.last_active()) {
                Some(old) => {
                    old.stats
                        .dropped_by_eviction(lock(&old.exchange).unanswered());
                    old.end(End::Evicted);
                    true
                }
                None => false,
            }
        };
        let gate = match l.gate.enter() {
            Some(g) => g,
            None if room() => l.gate.enter()?,
            None => return None,
        };
        let cap = service.max_connections;
        // The session idle longest may be another service's on a shared address: ending it would
        // make no room under this one's cap.
        if !(service.stats.enter(cap) || (!shared && room() && service.stats.enter(cap))) {
            return None;
        }
        match crate::session::admit_source(service, &l.gate.deny, d.from.ip()) {
            Ok(source) => Some((gate, source)),
            Err(_) => {
                service.stats.left();
                None
            }
        }
    }

    /// Starts a new session's task, in its own span.
    fn spawn(&self, l: &Loop, live: &Arc<Live>, id: u64) {
        let service = &live.service;
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
            cut: backend.cut_signal(),
            listening: l.listening.clone(),
            cids: self.cids.clone(),
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
    fn per_packet(&mut self, l: &Loop, target: &Target, service: &Arc<Service>, d: Received<'_>) {
        let stats = &target.stats;
        if l.draining.is_cancelled() {
            return stats.dropped(Dropped::Refused);
        }
        let from = d.from.ip();
        if !service.limits.permits(from) || l.gate.deny.refuses(from, Instant::now()) {
            return stats.dropped(Dropped::Refused);
        }
        let snapshot = service.pool.snapshot();
        let Some(backend) = snapshot.pick(d.from, &[]) else {
            service.note_selection(false);
            return stats.dropped(Dropped::NoBackend);
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
                    return stats.dropped(Dropped::NoBackend);
                }
            }
        }
        let Some(out) = &self.unconnected[family] else {
            return;
        };
        let Some(bytes) = framed(&mut self.scratch, service, d) else {
            return stats.dropped(Dropped::TooLarge);
        };
        let tally = stats.tally(backend);
        match out.send_to(bytes, backend.addr) {
            Ok(_) => {
                tally.carried(Direction::Up, d.bytes.len());
                backend.stats.moved(d.bytes.len() as u64, 0);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tally.dropped(Dropped::QueueFull),
            Err(e) => {
                tracing::debug!(error = %e, backend = %backend.addr, "per-packet send failed");
                tally.dropped(Dropped::SendFailed);
            }
        }
    }
}

/// Counts a failed send up: `false` when the backend's port was found closed (an ICMP
/// port-unreachable came back for an earlier datagram), which ends the session without taking
/// the datagram.
fn send_failed(live: &Live, e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::WouldBlock {
        live.stats.dropped(Dropped::QueueFull);
        return true;
    }
    if session::unreachable(e) {
        tracing::debug!(error = %e, backend = %live.backend.addr, "the backend is unreachable");
        live.end(End::BackendUnreachable);
        return false;
    }
    // Ours (no buffer, a local firewall, too large for the path): not the backend's.
    tracing::debug!(error = %e, "sending to the backend failed");
    let why = if e.raw_os_error() == Some(libc::EMSGSIZE) {
        Dropped::TooLarge
    } else {
        Dropped::SendFailed
    };
    live.stats.dropped(why);
    true
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

/// How a new session finds its backend.
enum Pick {
    /// By the service's policy, not this one (whose port was just found closed) unless it is the
    /// only one.
    Avoiding(Option<SocketAddr>),
    /// This one: a moved connection's.
    Backend(Arc<Backend>),
}

/// Counts `n` datagrams dropped before a service took them, on the address's fallback service.
fn count(routes: &Routes, why: Dropped, n: usize) {
    if let Some(t) = routes.fallback() {
        t.stats.dropped_n(why, n);
    }
}
