//! What a ring worker's loop (`ring/mod.rs`) asks of the services on the ring, answered as the
//! tokio side answers it: admission (the caps, the access lists and per-source limits), a backend (the policy, the
//! per-backend caps, another backend when a connect fails), the live byte counters, the backend's
//! cut, and the accounting and routing line of each connection's end. It is the ring's counterpart
//! of `listener` and `session`, with the same decisions: `Tried` picks as `session::connect` does,
//! and the end is counted by `session`'s own accounting.
//!
//! The control plane steers them as it does the tokio workers: a listening socket is handed to every
//! worker (a duplicated descriptor each; the kernel wakes one per connection), its routes read
//! through the same `ArcSwap` on every accept, so a reload reaches the next connection; a bound
//! address's `stop` unlistens it; the drain's deadline cuts what is left; every connection holds a
//! token of the drain's `TaskTracker`, so a drain waits for ring connections as for sessions.
//!
//! The PROXY protocol works as in `session`: `accept_proxy` has the worker read the header (within
//! its `timeout`) before anything else, from trusted peers only, and the header's client is the one
//! admitted, limited, hashed and logged; `proxy_protocol` sends the backend a header first.
//!
//! The queue: a connection that finds every backend full waits (in the worker, with no operation in
//! the kernel) with its place in the service's queue; a slot freed on any worker, or by a tokio
//! session of the same service, wakes every worker (`Command::Freed`, through `Queue::wake_with`),
//! whose waiting connections look again, oldest first; a timeout armed for the
//! earliest deadline of those waiting ends a wait at its deadline.
//!
//! A backend's cut (health's `on_down: close`, discovery's `on_removed`) tells every worker
//! (`Command::BackendCut`), which ends that backend's relayed connections at once; one still
//! connecting, or carried in, is asked as it connects or arrives, which also catches a cut that
//! raced the signal's first pick (`CutSignal::wake_with`). The workers' tick looks too, as a
//! backstop.
//!
//! An upgrade carries ring connections as it carries sessions: `Command::Carry` has each worker stop
//! its relayed connections at a quiet point and hand them here, where they go to `Leaving::carried`
//! with the facts of their routing line; the new process relays them on, on its ring workers when
//! their service runs on the ring there (`adopt`), else on the epoll engine.
//!
//! A reload may move an address off the ring (`control`'s `move_acceptors`): until a worker has
//! unlistened, its accepts still complete, and `hand_off` gives those clients to the tokio workers,
//! which serve them with the routes the reload left (TLS, a shared address's routes), as their own
//! accept loops would.
//!
//! Not yet on the ring (refused by the config's validation): TLS, shared addresses.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use tokio::time::Instant;

use socket2::SockRef;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use super::workers::{Served, Workers};
use crate::accesslog::{Ending, Record};
use crate::admission::{Gate, Queue, QueuePlace, SourceSlot};
use crate::config::BackendPort;
use crate::connections::{self, How};
use crate::listener;
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::proxy_protocol::{self, Header, Parsed, ReadError};
use crate::relay::Relayed;
use crate::relay::Supervised;
use crate::ring::{Admit, Finished, Got, Host, Quiet, Step, Target, Timeouts};
use crate::route::Routes;
use crate::service::Service;
use crate::session::{self, Carried, CarriedFacts, ClientSlot, Leaving, Reached, Tried};
use crate::util::{is_local_exhaustion, lock};

/// One worker's view of the services: its listeners and what admits a connection.
pub(super) struct Services {
    pub(super) gate: Arc<Gate>,
    pub(super) tracker: TaskTracker,
    pub(super) listeners: HashMap<u32, Served>,
    pub(super) workers: Arc<Workers>,
    /// Where carried connections go (an upgrade's), as the tokio sessions find it.
    pub(super) leaving: Arc<Leaving>,
    /// The tokio workers, which serve what this worker accepts for an address no longer on the
    /// ring (`hand_off`), in turn from `next_tokio`.
    pub(super) tokio: Vec<tokio::runtime::Handle>,
    pub(super) next_tokio: usize,
    /// The routes `hand_off` read for the client it gave back, for `accepted`, which the worker
    /// calls next: read once, so a reload between the two cannot have the ring admit a client the
    /// routes it then reads would give to the tokio workers.
    pub(super) routes_read: Option<Arc<Routes>>,
}

/// A connection's place in its service: its slots (released when it is dropped, after its end is
/// accounted), its backend and the routing record.
pub(crate) struct Taken {
    service: Arc<Service>,
    pub(super) record: Record,
    span: tracing::Span,
    tried: Tried,
    backend: Option<Picked>,
    connect_start: Instant,
    attempt_start: Instant,
    /// With `backend_port: same`: the port the client reached, which every backend is dialled on.
    reached_port: Option<u16>,
    /// Waiting for a backend with room: its place in the service's queue, and until when.
    pub(super) queued: Option<(QueuePlace, Instant)>,
    workers: Arc<Workers>,
    _source: Option<SourceSlot>,
    /// Its place in the service's count and in the operator's list (`connections`).
    slot: ClientSlot,
    _tracked: TaskTrackerToken,
}

/// The backend a connection is connecting or connected to, counted as active on it.
struct Picked {
    backend: Arc<Backend>,
    cut: Arc<CutSignal>,
    active: Option<ActiveGuard>,
    connected: bool,
    /// Told when the slot comes free (a capped backend of a service with a queue): its waiters on
    /// both data planes (a reload may have moved the service to an address the tokio workers
    /// serve, with the same queue).
    freed: Option<Arc<Queue>>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        // Released first: a waiter woken now must find the slot free.
        self.active.take();
        if let Some(queue) = &self.freed {
            queue.slot_freed();
        }
    }
}

impl Taken {
    /// A connection carried in from the process this one replaced, as `session::resume` takes it
    /// on the tokio workers: counted on its service and backend (above their caps if need be: it
    /// is open already), tracked by the drain, its routing line covering its whole life.
    pub(super) fn carried_in(
        facts: &CarriedFacts,
        service: Arc<Service>,
        workers: &Arc<Workers>,
        gate: &Arc<Gate>,
        tracker: &TaskTracker,
        listen: &Arc<str>,
    ) -> Taken {
        let at = session::carried_backend(&service, facts.backend);
        let reached = Reached {
            client: facts.client,
            listen,
            engine: "ring",
        };
        let age = std::time::Duration::from_millis(facts.age_ms);
        let slot = ClientSlot::carried(&service, gate, reached, age);
        slot.conn().wake_with(|| workers.look_waker());
        let record = facts.record(&service);
        // Listed as relaying from the start, with the bytes it moved in the process it left: it
        // never passes `relaying`, which lists a new connection.
        session::list_facts(slot.conn(), &record, Some(&at), Some("ring"), false);
        let stamp = crate::relay::stamp();
        slot.conn().moved(facts.bytes_up, facts.bytes_down, stamp);
        slot.conn().set_state(connections::State::Relaying);
        // As `pick` has it: a slot freed matters to the queue only on a capped backend.
        let capped = service.caps.cap_of(&at).is_some();
        Taken {
            record,
            span: session::carried_span(facts, &service),
            tried: Tried::default(),
            backend: Some(Picked {
                cut: workers.cut_signal(&at),
                active: ActiveGuard::within(at.clone(), None),
                backend: at,
                connected: true,
                freed: (capped && service.queue.is_some()).then(|| service.occupancy.queue.clone()),
            }),
            connect_start: Instant::now(),
            attempt_start: Instant::now(),
            reached_port: None,
            queued: None,
            workers: workers.clone(),
            _source: None,
            slot,
            _tracked: tracker.token(),
            service,
        }
    }

    /// How its service relays.
    pub(super) fn relay_options(&self) -> &crate::relay::RelayOptions {
        &self.service.relay
    }

    /// A PROXY header read from `peer` (or why there is none), taken as the tokio sessions take it.
    fn take_header(
        &mut self,
        header: Result<Header, String>,
        peer: SocketAddr,
    ) -> Result<Option<SocketAddr>, Outcome> {
        let _enter = self.span.enter();
        let warnings = &self.service.occupancy.proxy_warnings;
        session::take_header(header, peer, warnings, &mut self.record)
    }

    /// Admits the client (by the address a header named, if any: access lists, per-source limits)
    /// and picks its backend; the PROXY header to send it, if the service sends one. Both name the
    /// address the client reached (a header's, else ours): the header as its destination, and with
    /// `backend_port: same` its port is the backend's.
    fn admit(
        &mut self,
        reached: Option<SocketAddr>,
        client: BorrowedFd<'_>,
    ) -> Result<(Option<Target>, Vec<u8>), Outcome> {
        let origin = self.record.client;
        self._source = session::admit_source(&self.service, self.slot.deny(), origin.ip())?;
        let same_port = self.service.backend_port == BackendPort::Same;
        // Asked of the kernel only when something needs it (a system call per connection).
        let dst = (same_port || self.service.proxy_protocol.is_some()).then(|| {
            let local = || SockRef::from(&client).local_addr().ok()?.as_socket();
            reached.or_else(local).unwrap_or(origin)
        });
        self.reached_port = dst.filter(|_| same_port).map(|d| d.port());
        // `connect_ms` counts from here, as in the tokio sessions: not the header's read.
        self.connect_start = Instant::now();
        let target = self.pick()?;
        let preface = match (self.service.proxy_protocol, dst) {
            (Some(v), Some(dst)) => proxy_protocol::encode(v, origin, dst),
            _ => Vec::new(),
        };
        Ok((target, preface))
    }

    /// Accounts a connection refused before the ring had anything of it.
    fn refuse(&self, end: Outcome) {
        let ending = refused(end);
        self.span
            .in_scope(|| session::account(&self.service, &self.record, ending));
    }

    /// The attempt on the picked backend failed (`what`, logged): counted against the backend when
    /// `blame`, and not tried again by this connection; the next backend to try, unless the
    /// service's attempts are used up.
    fn attempt_failed(
        &mut self,
        error: &io::Error,
        what: &'static str,
        blame: bool,
    ) -> Result<Option<Target>, Outcome> {
        if let Some(p) = self.backend.take() {
            let _enter = self.span.enter();
            tracing::debug!(backend = %p.backend.addr, error = %error, "{what}");
            if blame {
                self.service.pool.connect_failed(&p.backend);
            }
            self.tried.failed(p.backend.addr);
        }
        // What the attempt recorded once it connected is not the connection's: as in the tokio
        // sessions, the routing line names, and times, only the backend that took it.
        self.record.backend_name = None;
        self.record.connect_ms = None;
        if self.record.attempts >= self.service.connect_attempts {
            return Err(Outcome::ConnectFailed);
        }
        self.pick()
    }

    /// The next backend to try: one not tried, below its cap; none when every one left is full
    /// and the connection may wait in the service's queue; or how the connection is refused.
    fn pick(&mut self) -> Result<Option<Target>, Outcome> {
        let service = self.service.clone();
        if service.queue.is_some() {
            // Before it looks (as the tokio sessions arm their wake-up before they look): a slot
            // freed between the look and its place in the queue, on any worker or by a tokio
            // session, makes every worker look again.
            service
                .occupancy
                .queue
                .wake_with(|| self.workers.freed_call());
        }
        loop {
            let picked = service
                .pool
                .snapshot()
                .pick(self.record.client, self.tried.avoid())
                .cloned();
            if self.record.attempts == 0 && !self.tried.any_full() {
                service.note_selection(picked.is_some());
            }
            let Some(backend) = picked else {
                if self.tried.any_full() {
                    return self.queue();
                }
                return Err(if self.record.attempts == 0 {
                    Outcome::NoBackend
                } else {
                    Outcome::ConnectFailed
                });
            };
            let cap = service.caps.cap_of(&backend);
            let Some(active) = ActiveGuard::within(backend.clone(), cap) else {
                self.tried.full(backend.addr);
                continue;
            };
            self.record.attempts += 1;
            self.record.backend = Some(backend.addr);
            self.attempt_start = Instant::now();
            let addr = match self.reached_port {
                Some(port) => SocketAddr::new(backend.addr.ip(), port),
                None => backend.addr,
            };
            self.backend = Some(Picked {
                cut: self.workers.cut_signal(&backend),
                backend,
                active: Some(active),
                connected: false,
                freed: (cap.is_some() && service.queue.is_some())
                    .then(|| service.occupancy.queue.clone()),
            });
            return Ok(Some(Target {
                addr,
                timeout: service.connect_timeout,
            }));
        }
    }

    /// Every backend left is full: a place in the queue (kept while the connection waits), or
    /// `BackendsFull` without a queue, with `max` waiting already, or once the wait is over.
    fn queue(&mut self) -> Result<Option<Target>, Outcome> {
        let Some(q) = self.service.queue else {
            return Err(Outcome::BackendsFull);
        };
        match &self.queued {
            Some((_, until)) if Instant::now() >= *until => Err(Outcome::BackendsFull),
            Some(_) => Ok(None),
            None => {
                let place = self.service.occupancy.queue.join(q.max);
                let place = place.ok_or(Outcome::BackendsFull)?;
                self.queued = Some((place, Instant::now() + q.timeout.0));
                Ok(None)
            }
        }
    }
}

impl Host for Services {
    type Listen = Served;
    type Conn = Taken;

    fn listening(&mut self, id: u32, with: Served) {
        self.listeners.insert(id, with);
    }

    fn unlistened(&mut self, id: u32) {
        self.listeners.remove(&id);
    }

    fn hand_off(&mut self, id: u32, client: OwnedFd, peer: SocketAddr) -> Option<OwnedFd> {
        let Some(served) = self.listeners.get(&id) else {
            return Some(client);
        };
        let routes = served.routes.load_full();
        if routes.on_ring() || self.tokio.is_empty() {
            self.routes_read = Some(routes);
            return Some(client);
        }
        let h = &self.tokio[self.next_tokio % self.tokio.len()];
        self.next_tokio = self.next_tokio.wrapping_add(1);
        // Tracked from now: a drain that begins before the task runs still waits for the client.
        let tracked = self.tracker.token();
        h.spawn(listener::hand_in(
            client.into(),
            peer,
            routes,
            served.local.clone(),
            self.gate.clone(),
            (self.tracker.clone(), tracked),
            self.leaving.clone(),
        ));
        None
    }

    fn enter_refused(&mut self, id: u32, socket: OwnedFd) {
        let Some(served) = self.listeners.get(&id) else {
            return;
        };
        let Some(h) = self.tokio.get(self.next_tokio % self.tokio.len().max(1)) else {
            tracing::error!(listen = %served.local, "ring worker: io_uring_enter keeps failing, and no tokio worker can take its listener");
            return;
        };
        self.next_tokio = self.next_tokio.wrapping_add(1);
        tracing::error!(listen = %served.local, "ring worker: io_uring_enter keeps failing; its listener is served on the epoll engine");
        let (routes, local, stop) = (
            served.routes.clone(),
            served.local.clone(),
            served.stop.clone(),
        );
        let (gate, tracker, leaving) = (
            self.gate.clone(),
            self.tracker.clone(),
            self.leaving.clone(),
        );
        // Accepting on the address until its stop, as the worker's accepts did.
        let accepting = served.accepting.clone();
        h.spawn(async move {
            let _accepting = accepting;
            let socket = std::net::TcpListener::from(socket);
            match socket
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(socket))
            {
                Ok(l) => listener::accept_loop(l, routes, gate, tracker, stop, leaving).await,
                Err(e) => {
                    tracing::error!(listen = %local, error = %e, "cannot serve a listener the ring worker gave up")
                }
            }
        });
    }

    fn accepted(
        &mut self,
        id: u32,
        peer: SocketAddr,
        client: BorrowedFd<'_>,
    ) -> Option<(Taken, Admit, Timeouts)> {
        let read = self.routes_read.take();
        let served = self.listeners.get(&id)?;
        // The routes as `hand_off` read them (a reload swaps them); the connection keeps its
        // service.
        let routes = read.unwrap_or_else(|| served.routes.load_full());
        let Some(current) = routes.table.only() else {
            // `hand_off` gave every client of a shared address to the tokio workers.
            tracing::warn!(listen = %served.local, "a ring worker was given a shared address; closing the client");
            return None;
        };
        let service = current.load_full();
        service.stats.accepted();
        let span = session::span(Some(&service.name), peer, &served.local);
        // The deny list before anything else, and before a byte is read (no receive is armed yet).
        if self.gate.deny.refuses(peer.ip(), Instant::now()) {
            span.in_scope(|| session::refuse_over_limit(&service, peer, Outcome::Denied));
            return None;
        }
        let at = Reached {
            client: peer,
            listen: &served.local,
            engine: "ring",
        };
        let slot = match ClientSlot::take(&service, self.gate.enter(), at) {
            Ok(slot) => slot,
            Err(end) => {
                span.in_scope(|| session::refuse_over_limit(&service, peer, end));
                return None;
            }
        };
        // A system call per option the service sets, none otherwise; none for a client refused.
        service
            .relay
            .client_watch
            .apply_or_log(SockRef::from(&client), "client");
        let now = Instant::now();
        let mut taken = Taken {
            record: Record::new(service.name.clone(), service.policy.as_str(), peer),
            service,
            span,
            tried: Tried::default(),
            backend: None,
            connect_start: now,
            attempt_start: now,
            reached_port: None,
            queued: None,
            workers: self.workers.clone(),
            _source: None,
            slot,
            _tracked: self.tracker.token(),
        };
        taken.slot.conn().wake_with(|| self.workers.look_waker());
        let timeouts = Timeouts::of(&taken.service.relay);
        let service = taken.service.clone();
        let admitted = match &service.accept_proxy {
            // A balancer in front names the client in a header: read it before anything else.
            Some(accept) if session::may_send_header(accept, peer) => {
                return Some((
                    taken,
                    Admit::Read {
                        limit: accept.timeout.0,
                        room: proxy_protocol::MAX_HEADER,
                    },
                    timeouts,
                ));
            }
            Some(_) => taken.take_header(Err(session::UNTRUSTED.to_string()), peer),
            None => Ok(None),
        };
        match admitted.and_then(|reached| taken.admit(reached, client)) {
            Ok((target, preface)) => Some((taken, Admit::Connect { target, preface }, timeouts)),
            Err(end) => {
                taken.refuse(end);
                None
            }
        }
    }

    fn preamble(&mut self, t: &mut Taken, client: BorrowedFd<'_>, got: Got<'_>) -> Step {
        let header = match got {
            Got::Bytes(b) => match proxy_protocol::parse(b) {
                Parsed::Done(h, len) => Ok((h, len)),
                Parsed::Incomplete { .. } => return Step::More,
                Parsed::Malformed(m) => Err(ReadError::Malformed(m)),
            },
            Got::Closed(n) => Err(ReadError::Truncated(n)),
            Got::TimedOut => Err(ReadError::TimedOut),
            Got::Failed(e) => Err(ReadError::Io(e)),
        };
        let peer = t.record.client;
        let (header, consumed) = match header {
            Ok((h, len)) => (Ok(h), len),
            Err(e) => (Err(e.to_string()), 0),
        };
        let admitted = t
            .take_header(header, peer)
            .and_then(|reached| t.admit(reached, client));
        match admitted {
            Ok((target, preface)) => Step::Connect {
                target,
                consumed,
                preface,
            },
            Err(end) => Step::Refuse(end),
        }
    }

    fn connect_failed(
        &mut self,
        t: &mut Taken,
        error: io::Error,
    ) -> Result<Option<Target>, Outcome> {
        // Our own descriptors or ports ran out: not the backend's fault, so no ejection.
        let ours = is_local_exhaustion(&error);
        let what = if ours {
            "connect failed locally"
        } else {
            "connect failed"
        };
        t.attempt_failed(&error, what, !ours)
    }

    fn first_bytes_failed(
        &mut self,
        t: &mut Taken,
        error: io::Error,
    ) -> Result<Option<Target>, Outcome> {
        // As in `session::connect`: a backend that accepts and closes is not dead, so no
        // ejection; this connection tries another.
        t.attempt_failed(
            &error,
            "sending the PROXY header or the first bytes failed",
            false,
        )
    }

    fn retry(&mut self, t: &mut Taken) -> Result<Option<Target>, Outcome> {
        // The full ones are worth another look: one may have a slot now.
        t.tried.retry_full();
        t.pick()
    }

    fn wait_left(&self, t: &Taken) -> Option<std::time::Duration> {
        let now = Instant::now();
        t.queued
            .as_ref()
            .map(|(_, until)| until.saturating_duration_since(now))
    }

    fn backend_socket(&mut self, t: &Taken, socket: BorrowedFd<'_>) {
        t.service
            .relay
            .backend_watch
            .apply_or_log(SockRef::from(&socket), "backend");
    }

    fn connected(&mut self, t: &mut Taken) {
        let Some(p) = t.backend.as_mut() else { return };
        p.connected = true;
        t.record.backend_name = p.backend.name();
        // Unlike the routing line's fields (`attempt_failed`), a span's cannot be taken back: if
        // this attempt is dropped, the span still names this backend until another connects.
        t.span
            .record("backend", tracing::field::display(p.backend.addr));
    }

    fn established(&mut self, t: &mut Taken) {
        let Some(p) = t.backend.as_ref() else { return };
        p.backend.stats.connected(t.attempt_start.elapsed());
        t.service.pool.connect_succeeded(&p.backend);
        t.record.connect_ms = Some(t.connect_start.elapsed().as_secs_f64() * 1e3);
    }

    fn relaying(&mut self, t: &mut Taken) {
        // Out of the queue: the place (and its deadline) held across failed attempts, the failed
        // sending of its first bytes among them, as in `session::connect`.
        t.queued = None;
        let backend = t.backend.as_ref().map(|p| &*p.backend);
        session::list_facts(t.slot.conn(), &t.record, backend, Some("ring"), false);
        t.slot.conn().set_state(connections::State::Relaying);
        let _span = t.span.enter();
        crate::accesslog::emit_connect(&t.record, t.slot.conn().id);
    }

    fn sent(&mut self, t: &Taken, up: u64, down: u64) {
        if let Some(p) = &t.backend {
            p.backend.stats.moved(up, down);
        }
        t.slot.conn().moved(up, down, crate::relay::stamp());
    }

    fn cut(&mut self, t: &Taken) -> Option<Supervised> {
        match t.slot.conn().kill_asked() {
            Some(How::Fin) => return Some(Supervised::ended(Outcome::Killed)),
            Some(How::Reset) => return Some(Supervised::cut(Outcome::Killed)),
            None => {}
        }
        t.backend
            .as_ref()
            .and_then(|p| p.cut.fired())
            .map(Supervised::cut)
    }

    fn half_closed(&mut self, t: &Taken) {
        t.slot.conn().set_state(connections::State::HalfClosed);
    }

    fn ended(&mut self, t: Taken, f: Finished) {
        let relayed = t.backend.as_ref().is_some_and(|p| p.connected);
        let _enter = t.span.enter();
        if relayed {
            let r = Relayed {
                bytes_up: f.bytes_up,
                bytes_down: f.bytes_down,
                end: f.end,
                spliced: f.spliced,
                ring: true,
                broken: f.broken,
                carried: None,
            };
            session::account_relayed(&t.service, &t.record, &r);
        } else {
            session::account(&t.service, &t.record, refused(f.end));
        }
    }

    type Carrier = tokio::sync::mpsc::UnboundedSender<Carried>;

    fn carrier(&mut self) -> Option<Self::Carrier> {
        lock(&self.leaving.carried).clone()
    }

    fn carried(&mut self, t: Taken, to: Self::Carrier, q: Quiet) {
        let client = std::net::TcpStream::from(q.client);
        let backend = std::net::TcpStream::from(q.backend);
        // Lost on the way (the new process gone, its config without the service), the connection
        // must end with a reset, never a FIN that passes for the stream's end; whoever relays it
        // on clears this (`session::resume`), as for a tokio session's (`session::carry_away`).
        for s in [&client, &backend] {
            let _ = SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
        let at = session::backend_addr(&backend);
        let facts = CarriedFacts::of(&t.record, q.bytes_up, q.bytes_down, at);
        let carried = Carried {
            client,
            backend,
            held: q.held,
            facts,
        };
        let _enter = t.span.enter();
        if to.send(carried).is_ok() {
            tracing::debug!("carried to the new process");
        } else {
            // The forwarder is gone (it outlives every sender, so only by a panic): the
            // connection closes here with the reset armed above.
            tracing::warn!("a carried connection found nothing to take it; reset");
        }
        // `t` goes: its slots are released and the drain no longer waits for it.
    }
}

fn refused(end: Outcome) -> Ending {
    Ending {
        bytes_up: 0,
        bytes_down: 0,
        end,
    }
}
