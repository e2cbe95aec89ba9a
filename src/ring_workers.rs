//! The ring workers: the data-plane threads of the services set to `relay: ring`, each running one
//! io_uring loop (`relay/ring.rs`) instead of a tokio runtime, and what such a loop asks of the
//! services: admission (the caps, the access lists and per-source limits), a backend (the policy, the
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
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use arc_swap::ArcSwap;
use socket2::SockRef;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use crate::accesslog::{Ending, Record};
use crate::admission::{Gate, Queue, QueuePlace, SourceSlot};
use crate::config::BackendPort;
use crate::listener;
use crate::metrics::{Family, Kind, Subject, Table};
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::proxy_protocol::{self, Header, Parsed, ReadError};
use crate::relay::ring::{
    self, Admit, Adopt, Command, Finished, Got, Host, Quiet, Step, Target, Timeouts,
};
use crate::relay::Relayed;
use crate::route::Routes;
use crate::service::Service;
use crate::session::{self, Carried, CarriedFacts, ClientSlot, Leaving, Tried};
use crate::util::{is_local_exhaustion, lock};

/// The ring worker threads, one per core; started when the first `relay: ring` service binds.
pub(crate) struct RingWorkers {
    handles: Vec<ring::Handle<Served, Taken>>,
    /// The same handles, as the workers hold them to tell each other of a freed slot.
    workers: Arc<Workers>,
    /// Each worker's name on `/metrics` (`r0`, …: its thread is `sluicegate-r0`).
    names: Vec<Arc<str>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    next_id: AtomicU32,
    /// The worker the next connection carried in goes to.
    next_adopter: AtomicUsize,
}

/// A listening socket as its workers serve it. Each worker's holds a token of the control plane's
/// `accepting` tracker until the worker has stopped accepting on it.
pub(crate) struct Served {
    routes: Arc<ArcSwap<Routes>>,
    local: Arc<str>,
    /// The address's stop, for an accept loop that takes over from a worker that cannot enter its
    /// ring (`Host::enter_refused`).
    stop: CancellationToken,
    accepting: TaskTrackerToken,
}

impl RingWorkers {
    /// Starts `n` (at least one) workers; connections are admitted through `gate` and tracked by
    /// `tracker`.
    pub(crate) fn start(
        n: usize,
        gate: Arc<Gate>,
        tracker: TaskTracker,
        leaving: Arc<Leaving>,
        tokio: Vec<tokio::runtime::Handle>,
    ) -> io::Result<RingWorkers> {
        let start_one = |i, services: Services| {
            ring::start(format!("sluicegate-r{i}"), || services, ring::TICK)
        };
        RingWorkers::start_each(n, gate, tracker, leaving, tokio, start_one)
    }

    /// [`start`](RingWorkers::start), each worker started by `start_one(i, its host)`. When one
    /// cannot start, those already running are told to stop (their threads then end), and the
    /// error is returned.
    fn start_each(
        n: usize,
        gate: Arc<Gate>,
        tracker: TaskTracker,
        leaving: Arc<Leaving>,
        tokio: Vec<tokio::runtime::Handle>,
        mut start_one: impl FnMut(usize, Services) -> io::Result<ring::Started<Services>>,
    ) -> io::Result<RingWorkers> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        let workers = Arc::new(Workers::default());
        for i in 0..n.max(1) {
            let services = Services {
                gate: gate.clone(),
                tracker: tracker.clone(),
                listeners: HashMap::new(),
                workers: workers.clone(),
                leaving: leaving.clone(),
                tokio: tokio.clone(),
                next_tokio: i,
                routes_read: None,
            };
            match start_one(i, services) {
                Ok((h, t)) => {
                    handles.push(h);
                    threads.push(t);
                }
                Err(e) => {
                    for h in &handles {
                        h.send(Command::Stop);
                    }
                    return Err(e);
                }
            }
        }
        // A slot freed before this wakes nobody, and no one waits yet.
        *lock(&workers.0) = handles.clone();
        let names = (0..handles.len()).map(|i| format!("r{i}").into()).collect();
        Ok(RingWorkers {
            handles,
            workers,
            names,
            threads: Mutex::new(threads),
            next_id: AtomicU32::new(0),
            next_adopter: AtomicUsize::new(0),
        })
    }

    /// Serves `socket` on every worker until `stop` is cancelled (then new connections are refused,
    /// as with the accept loops; those accepted go on); a task on `rt` watches `stop`.
    pub(crate) fn listen(
        &self,
        rt: &tokio::runtime::Handle,
        socket: std::net::TcpListener,
        routes: Arc<ArcSwap<Routes>>,
        stop: CancellationToken,
        accepting: &TaskTracker,
    ) {
        let id = self.next_id.fetch_add(1, Relaxed);
        let local: Arc<str> = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
            .into();
        let mut socket = Some(socket);
        for (i, h) in self.handles.iter().enumerate() {
            let mine = if i + 1 == self.handles.len() {
                socket.take()
            } else {
                match socket.as_ref().map(std::net::TcpListener::try_clone) {
                    Some(Ok(dup)) => Some(dup),
                    Some(Err(e)) => {
                        // Out of descriptors: the workers that have one accept for all.
                        tracing::warn!(listen = %local, error = %e, "cannot share the listener with every ring worker");
                        continue;
                    }
                    None => None,
                }
            };
            let Some(mine) = mine else { break };
            let with = Served {
                routes: routes.clone(),
                local: local.clone(),
                stop: stop.clone(),
                accepting: accepting.token(),
            };
            h.send(Command::Listen {
                id,
                socket: mine,
                with,
            });
        }
        let handles = self.handles.clone();
        rt.spawn(async move {
            stop.cancelled().await;
            for h in &handles {
                h.send(Command::Unlisten { id });
            }
        });
    }

    /// Relays on, in turn on each worker, a connection carried in from the process this one
    /// replaced (an upgrade), as `session::resume` does on the tokio workers: counted on its
    /// service and backend (above their caps if need be: it is open already), tracked by the
    /// drain, its routing line covering its whole life.
    pub(crate) fn adopt(
        &self,
        carried: Carried,
        service: Arc<Service>,
        gate: &Arc<Gate>,
        tracker: &TaskTracker,
    ) {
        let n = self.handles.len().max(1);
        let h = &self.handles[self.next_adopter.fetch_add(1, Relaxed) % n];
        let facts = carried.facts;
        let at = session::carried_backend(&service, facts.backend);
        // As `pick` has it: a slot freed matters to the queue only on a capped backend.
        let capped = service.caps.cap_of(&at).is_some();
        let taken = Taken {
            record: facts.record(&service),
            span: session::carried_span(&facts, &service),
            tried: Tried::default(),
            backend: Some(Picked {
                cut: self.workers.cut_signal(&at),
                active: ActiveGuard::within(at.clone(), None),
                backend: at,
                connected: true,
                freed: (capped && service.queue.is_some()).then(|| service.occupancy.queue.clone()),
            }),
            connect_start: Instant::now(),
            attempt_start: Instant::now(),
            reached_port: None,
            queued: None,
            workers: self.workers.clone(),
            _source: None,
            _slot: ClientSlot::carried(&service, gate),
            _tracked: tracker.token(),
            service,
        };
        let timeouts = Timeouts::of(&taken.service.relay);
        // The reset armed while in transit stays armed until the worker has it (`ring::Adopt`).
        let adopt = Adopt {
            conn: taken,
            client: carried.client.into(),
            backend: carried.backend.into(),
            held: carried.held,
            so_far: (facts.bytes_up, facts.bytes_down),
            timeouts,
        };
        if !h.send(Command::Adopt(Box::new(adopt))) {
            // The worker has ended (the process is stopping): both sides are reset.
            tracing::warn!(service = %facts.service, client = %facts.client, "no ring worker to take a carried connection: reset");
        }
    }

    /// Cuts every connection of every worker (the drain's deadline).
    pub(crate) fn cut(&self, end: Outcome) {
        for h in &self.handles {
            h.send(Command::Cut(end));
        }
    }

    /// Has every worker carry its relayed connections to `Leaving::carried` (an upgrade), each at
    /// a quiet point, until that takes no more.
    pub(crate) fn carry(&self) {
        for h in &self.handles {
            h.send(Command::Carry);
        }
    }

    /// Ends every worker (what is still open is cut) and waits for its thread. Must not be called
    /// from an async context: it blocks.
    pub(crate) fn stop(&self) {
        lock(&self.workers.0).clear();
        for h in &self.handles {
            h.send(Command::Stop);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl RingWorkers {
    /// Each worker's counters now, for `/metrics` ([`METRICS`]).
    pub(crate) fn views(&self) -> Vec<WorkerView> {
        let load = |c: &AtomicU64| c.load(Relaxed);
        self.names
            .iter()
            .zip(&self.handles)
            .map(|(name, h)| {
                let c = h.counts();
                WorkerView {
                    name: name.clone(),
                    accepted: load(&c.accepted),
                    open: load(&c.open),
                    receives_armed: load(&c.receives_armed),
                    cancels_at_cap: load(&c.cancels_at_cap),
                    starved: load(&c.starved),
                    pool_given: load(&c.pool_given),
                    pool_held: load(&c.pool_held),
                    own_receives: load(&c.own_receives),
                    splices_stuck: load(&c.splices_stuck),
                    carried: load(&c.carried),
                    adopted: load(&c.adopted),
                }
            })
            .collect()
    }
}

/// One ring worker's counters, as `/metrics` exports them.
#[derive(Default)]
pub(crate) struct WorkerView {
    name: Arc<str>,
    accepted: u64,
    open: u64,
    receives_armed: u64,
    cancels_at_cap: u64,
    starved: u64,
    pool_given: u64,
    pool_held: u64,
    own_receives: u64,
    splices_stuck: u64,
    carried: u64,
    adopted: u64,
}

impl Subject for WorkerView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.name)
    }
}

/// What `/metrics` exports about each ring worker (once the first `relay: ring` service started
/// them): how evenly the kernel spreads clients over them, and how often back-pressure and the
/// buffer pool limited a direction.
pub(crate) const METRICS: Table<WorkerView> = Table {
    subject: &["worker"],
    families: &[
        Family::new(
            Kind::Counter,
            "sluicegate_ring_accepted_total",
            "Clients the ring worker accepted.",
            &[],
            |w, o| o.put(&[], w.accepted),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_ring_connections",
            "Connections open on the ring worker.",
            &[],
            |w, o| o.put(&[], w.open),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_receives_armed_total",
            "Receives the ring worker armed (two per connection unless a direction was stopped by back-pressure or a dry pool; one-shot for a direction a dry pool stopped, multishot otherwise).",
            &[],
            |w, o| o.put(&[], w.receives_armed),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_receive_cancels_at_cap_total",
            "Receives stopped because their direction held as many buffers as the cap allows (8, fewer once half the pool is held) that its destination had not taken (back-pressure).",
            &[],
            |w, o| o.put(&[], w.cancels_at_cap),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_receives_starved_total",
            "Receives that found the ring worker's buffer pool empty (ENOBUFS); the pool grows if it can, else the direction receives again once a buffer comes back.",
            &[],
            |w, o| o.put(&[], w.starved),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_ring_pool_buffers",
            "Buffers of 16 KiB the ring worker's pool has given the kernel (64 at first, 64 more each time it runs dry, at most 1,024): what of the pool can be resident.",
            &[],
            |w, o| o.put(&[], w.pool_given),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_ring_pool_held",
            "Buffers of the ring worker's pool that directions hold (read, not yet taken by their destination), as of its last tick: the per-direction cap shrinks from 8 towards 1 as this passes half the pool.",
            &[],
            |w, o| o.put(&[], w.pool_held),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_receives_own_buffer_total",
            "Receives of a direction that held no buffer into the connection's own 16 KiB buffer, because the pool had given every buffer and none was free.",
            &[],
            |w, o| o.put(&[], w.own_receives),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_splices_stuck_total",
            "Spliced directions that went back to receiving: their source polled readable and splice found nothing (TCP urgent data).",
            &[],
            |w, o| o.put(&[], w.splices_stuck),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_carried_total",
            "Connections the ring worker stopped at a quiet point and handed to an upgrade's new process.",
            &[],
            |w, o| o.put(&[], w.carried),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_ring_adopted_total",
            "Connections an upgrade carried in from the process this one replaced that the ring worker relays on.",
            &[],
            |w, o| o.put(&[], w.adopted),
        ),
    ],
};

impl Drop for RingWorkers {
    fn drop(&mut self) {
        // Not joined here: a drop may happen on any thread, including inside a runtime. Each
        // worker closes its listeners, cuts what is left and ends within a second.
        lock(&self.workers.0).clear();
        for h in &self.handles {
            h.send(Command::Stop);
        }
    }
}

/// One worker's view of the services: its listeners and what admits a connection.
struct Services {
    gate: Arc<Gate>,
    tracker: TaskTracker,
    listeners: HashMap<u32, Served>,
    workers: Arc<Workers>,
    /// Where carried connections go (an upgrade's), as the tokio sessions find it.
    leaving: Arc<Leaving>,
    /// The tokio workers, which serve what this worker accepts for an address no longer on the
    /// ring (`hand_off`), in turn from `next_tokio`.
    tokio: Vec<tokio::runtime::Handle>,
    next_tokio: usize,
    /// The routes `hand_off` read for the client it gave back, for `accepted`, which the worker
    /// calls next: read once, so a reload between the two cannot have the ring admit a client the
    /// routes it then reads would give to the tokio workers.
    routes_read: Option<Arc<Routes>>,
}

/// A connection's place in its service: its slots (released when it is dropped, after its end is
/// accounted), its backend and the routing record.
pub(crate) struct Taken {
    service: Arc<Service>,
    record: Record,
    span: tracing::Span,
    tried: Tried,
    backend: Option<Picked>,
    connect_start: Instant,
    attempt_start: Instant,
    /// With `backend_port: same`: the port the client reached, which every backend is dialled on.
    reached_port: Option<u16>,
    /// Waiting for a backend with room: its place in the service's queue, and until when.
    queued: Option<(QueuePlace, Instant)>,
    workers: Arc<Workers>,
    _source: Option<SourceSlot>,
    _slot: ClientSlot,
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

/// Every ring worker's handle (set once they have all started), so a slot freed on one reaches
/// the connections waiting for one on any. Emptied when the workers stop: each worker holds this,
/// and a handle in it would keep the worker's own channel open.
#[derive(Default)]
struct Workers(Mutex<Vec<ring::Handle<Served, Taken>>>);

impl Workers {
    /// What a service's queue calls when a slot comes free, on either data plane
    /// ([`Queue::wake_with`]): every worker's waiting connections look again.
    fn freed_call(self: &Arc<Self>) -> Arc<dyn Fn() + Send + Sync> {
        // Weak: the queue lives with the service, which may outlive the workers.
        let workers = Arc::downgrade(self);
        Arc::new(move || {
            if let Some(w) = workers.upgrade() {
                for h in lock(&w.0).iter() {
                    h.send(Command::Freed);
                }
            }
        })
    }

    /// `backend`'s cut signal, set to tell every worker (`Command::BackendCut`) when it fires, so
    /// its connections are cut at once rather than on a worker's next tick.
    fn cut_signal(self: &Arc<Self>, backend: &Backend) -> Arc<CutSignal> {
        let cut = backend.cut_signal();
        cut.wake_with(|| {
            // Weak: the signal lives with the backend, which may outlive the workers.
            let workers = Arc::downgrade(self);
            Arc::new(move || {
                if let Some(w) = workers.upgrade() {
                    for h in lock(&w.0).iter() {
                        h.send(Command::BackendCut);
                    }
                }
            })
        });
        cut
    }
}

impl Taken {
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
        self._source = session::admit_source(&self.service, origin.ip())?;
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
        service.stats.accepted.fetch_add(1, Relaxed);
        let span = session::span(Some(&service.name), peer, &served.local);
        let slot = match ClientSlot::take(&service, self.gate.enter()) {
            Ok(slot) => slot,
            Err(end) => {
                span.in_scope(|| session::refuse_over_limit(&service, peer, end));
                return None;
            }
        };
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
            _slot: slot,
            _tracked: self.tracker.token(),
        };
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
        p.backend.stats.connect.observe(t.attempt_start.elapsed());
        t.service.pool.connect_succeeded(&p.backend);
        t.record.connect_ms = Some(t.connect_start.elapsed().as_secs_f64() * 1e3);
    }

    fn relaying(&mut self, t: &mut Taken) {
        // Out of the queue: the place (and its deadline) held across failed attempts, the failed
        // sending of its first bytes among them, as in `session::connect`.
        t.queued = None;
    }

    fn sent(&mut self, t: &Taken, up: u64, down: u64) {
        if let Some(p) = &t.backend {
            p.backend.stats.bytes_up.fetch_add(up, Relaxed);
            p.backend.stats.bytes_down.fetch_add(down, Relaxed);
        }
    }

    fn cut(&mut self, t: &Taken) -> Option<Outcome> {
        t.backend.as_ref().and_then(|p| p.cut.fired())
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
                uring: true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::events::EventBus;
    use crate::route::{Table, Unrouted};
    use crate::tls::ServiceTls;
    use std::os::fd::AsFd;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server for one connection.
    async fn echo() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        addr
    }

    /// The routes of `yaml`'s services, and its first service.
    fn routes_of(yaml: &str) -> (Arc<ArcSwap<Routes>>, Arc<Service>) {
        let cfg = Config::from_yaml(yaml).unwrap();
        let services: Vec<_> = cfg
            .services
            .iter()
            .zip(cfg.alone())
            .map(|(s, alone)| {
                let service = Service::new(s, alone, ServiceTls::default(), &EventBus::default());
                (s.route_keys(), Arc::new(ArcSwap::from_pointee(service)))
            })
            .collect();
        let first = services[0].1.load_full();
        let routes = Arc::new(ArcSwap::from_pointee(Routes {
            table: Table::new(services),
            accept_proxy: None,
            hello_timeout: Duration::from_secs(5),
            max_pending: crate::config::DEFAULT_MAX_PENDING,
            unrouted: Arc::new(Unrouted::default()),
        }));
        (routes, first)
    }

    /// One ring worker whose tick is an hour: what it does at once is not the tick's doing.
    fn untimed_ring(name: &str) -> RingWorkers {
        RingWorkers::start_each(
            1,
            Arc::new(Gate::new(None)),
            TaskTracker::new(),
            Arc::new(Leaving::default()),
            vec![tokio::runtime::Handle::current()],
            |_, services| ring::start(name.into(), || services, Duration::from_secs(3600)),
        )
        .unwrap()
    }

    /// Serves `routes` on a new loopback address of `ring`: the address, and the token that stops
    /// the listener.
    fn serve(ring: &RingWorkers, routes: Arc<ArcSwap<Routes>>) -> (SocketAddr, CancellationToken) {
        let socket = listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let (stop, accepting) = (CancellationToken::new(), TaskTracker::new());
        let handle = tokio::runtime::Handle::current();
        ring.listen(&handle, socket, routes, stop.clone(), &accepting);
        (addr, stop)
    }

    /// Serves `routes` on a new loopback address of `ring`: a client that has had a message relayed
    /// there and back, and the token that stops the listener.
    async fn relayed_client(
        ring: &RingWorkers,
        routes: Arc<ArcSwap<Routes>>,
    ) -> (tokio::net::TcpStream, CancellationToken) {
        let (addr, stop) = serve(ring, routes);
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"through").await.unwrap();
        let mut got = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("relayed within 10 s")
            .unwrap();
        assert_eq!(&got, b"through");
        (client, stop)
    }

    /// A backend removed with its sessions closed (the admin API's `close`; health's
    /// `on_down: close` and discovery's `on_removed` cut the same way): its connection on a ring
    /// worker is reset at once, told by the cut itself, not on the worker's tick, here stretched
    /// to an hour (and the service's idle timeout with it, which would shorten the tick).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backend_cut_resets_its_ring_connections_without_the_tick() {
        if let Err(why) = ring::availability() {
            eprintln!("skipped: no ring worker here: {why}");
            return;
        }
        let backend = echo().await;
        let (routes, web) = routes_of(&format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: ring\n    idle_timeout: 4h\n    backends: [{{address: \"{backend}\"}}]\n"
        ));
        let ring = untimed_ring("sg-test-cut");
        let (mut client, stop) = relayed_client(&ring, routes).await;
        web.pool.remove_api(backend, true).unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut [0u8; 1]))
            .await
            .expect("cut within 10 s, not on the tick");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
        tokio::time::timeout(Duration::from_secs(10), async {
            while web.stats.ended(Outcome::BackendRemoved) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("counted as the backend's removal within 10 s");
        stop.cancel();
        tokio::task::spawn_blocking(move || ring.stop())
            .await
            .unwrap();
    }

    /// One worker of two cannot start (its thread or ring refused, for want of memory): the one
    /// already running is told to stop, and its thread ends (it would otherwise wait in its ring
    /// for good, with its host's references to the control plane), and the caller gets the
    /// error, on which the services run on the epoll engine (`Control::ring_workers`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_cannot_start_stops_those_started_before_it() {
        if let Err(why) = ring::availability() {
            eprintln!("skipped: no ring worker here: {why}");
            return;
        }
        let gate = Arc::new(Gate::new(None));
        let tokio = vec![tokio::runtime::Handle::current()];
        let leaving = Arc::new(Leaving::default());
        let mut started = 0;
        let result = RingWorkers::start_each(
            2,
            gate.clone(),
            TaskTracker::new(),
            leaving,
            tokio,
            |i, services| {
                if i == 0 {
                    started += 1;
                    ring::start("sg-test-start0".into(), || services, ring::TICK)
                } else {
                    Err(io::Error::other("worker 1: no memory for its ring"))
                }
            },
        );
        let Err(e) = result else {
            panic!("the workers started although one could not");
        };
        assert_eq!(e.to_string(), "worker 1: no memory for its ring");
        assert_eq!(started, 1, "the first worker was started");
        // Each worker's host holds the gate: it is the test's alone once the thread has ended.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&gate) > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker that started still runs 10 s after its sibling failed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A ring connection waiting in the queue looks again when a slot comes free outside the ring:
    /// a tokio session's backend connection ends (a reload moved the service off the ring, or a
    /// carried connection resumed on the tokio workers). The test holds the backend's one slot as
    /// a session holds it, then frees it as a session's end does; the worker's tick is an hour and
    /// the wait five minutes, so only the freed slot can have it look.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_freed_by_a_tokio_session_wakes_the_rings_waiting_connection() {
        if let Err(why) = ring::availability() {
            eprintln!("skipped: no ring worker here: {why}");
            return;
        }
        let backend = echo().await;
        let (routes, web) = routes_of(&format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: ring\n    idle_timeout: 4h\n    queue: {{max: 8, timeout: 5m}}\n    backends: [{{address: \"{backend}\", max_connections: 1}}]\n"
        ));
        let ring = untimed_ring("sg-test-freed");
        let member = web.pool.member(backend).expect("the backend");
        let held = ActiveGuard::within(member, Some(1)).expect("its one slot is free");
        let (addr, stop) = serve(&ring, routes);
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"waiting").await.unwrap();
        let queue = web.occupancy.queue.clone();
        tokio::time::timeout(Duration::from_secs(10), async {
            while queue.waiting() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the client waits in the queue within 10 s");
        // As a tokio session's `BackendSlot` ends.
        drop(held);
        queue.slot_freed();
        let mut got = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("relayed once the slot came free, not at the tick or the wait's end")
            .unwrap();
        assert_eq!(&got, b"waiting");
        stop.cancel();
        tokio::task::spawn_blocking(move || ring.stop())
            .await
            .unwrap();
    }

    /// An attempt dropped after its backend took the connection (the PROXY header, or the client's
    /// first bytes, could not be sent to it) leaves nothing of itself in the routing line: when
    /// the next backend refuses too, the line has no backend name and no connect time, as the
    /// tokio sessions log it.
    #[tokio::test]
    async fn a_dropped_attempt_leaves_no_name_or_connect_time_in_the_routing_line() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.2:9".parse().unwrap(),
        );
        let (routes, web) = routes_of(&format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: ring\n    connect_attempts: 2\n    backends: [{{address: \"{a}\"}}, {{address: \"{b}\"}}]\n"
        ));
        web.pool.name_backend(a, "alpha");
        web.pool.name_backend(b, "beta");
        let (mut host, mut t, admit) = accepted_by_hand(routes);
        let Admit::Connect {
            target: Some(first),
            ..
        } = admit
        else {
            panic!("a backend to connect to");
        };
        host.connected(&mut t);
        host.established(&mut t);
        assert!(t.record.backend_name.is_some() && t.record.connect_ms.is_some());
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let next = host.first_bytes_failed(&mut t, reset).unwrap();
        let next = next.expect("the other backend");
        assert_ne!(next.addr, first.addr);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let end = host.connect_failed(&mut t, refused).err();
        assert_eq!(end, Some(Outcome::ConnectFailed));
        assert_eq!(t.record.backend_name, None, "no backend took it");
        assert_eq!(t.record.connect_ms, None, "no connect succeeded");
    }

    /// A host serving `routes` as listener 0, with no ring (its callbacks called by hand), and
    /// the connection it admitted, with what it said comes next.
    fn accepted_by_hand(routes: Arc<ArcSwap<Routes>>) -> (Services, Taken, Admit) {
        let mut host = Services {
            gate: Arc::new(Gate::new(None)),
            tracker: TaskTracker::new(),
            listeners: HashMap::new(),
            workers: Arc::new(Workers::default()),
            leaving: Arc::new(Leaving::default()),
            tokio: Vec::new(),
            next_tokio: 0,
            routes_read: None,
        };
        host.listening(
            0,
            Served {
                routes,
                local: "127.0.0.1:1".into(),
                stop: CancellationToken::new(),
                accepting: TaskTracker::new().token(),
            },
        );
        let client = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = "127.0.0.1:5555".parse().unwrap();
        let (t, admit, _) = host.accepted(0, peer, client.as_fd()).expect("admitted");
        (host, t, admit)
    }

    /// A connection that waited in the queue keeps its place there, and the place's deadline,
    /// across an attempt whose first bytes could not be sent, even one its backend was credited
    /// for (`established`: a preface out, the client's bytes after it not), as the tokio sessions
    /// keep theirs until their forward is out. It leaves the queue once it relays.
    #[tokio::test]
    async fn a_queued_connection_keeps_its_place_until_it_relays() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.2:9".parse().unwrap(),
        );
        let (routes, web) = routes_of(&format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: ring\n    connect_attempts: 3\n    queue: {{max: 8, timeout: 5m}}\n    backends: [{{address: \"{a}\", max_connections: 1}}, {{address: \"{b}\", max_connections: 1}}]\n"
        ));
        let hold = |addr| ActiveGuard::within(web.pool.member(addr).expect("a backend"), Some(1));
        let (held_a, held_b) = (hold(a).expect("a's slot"), hold(b).expect("b's slot"));
        let (mut host, mut t, admit) = accepted_by_hand(routes);
        assert!(
            matches!(admit, Admit::Connect { target: None, .. }),
            "both full: it waits"
        );
        let queue = &web.occupancy.queue;
        let deadline = |t: &Taken| t.queued.as_ref().map(|(_, until)| *until);
        let until = deadline(&t).expect("a place in the queue");
        drop(held_a);
        let first = host.retry(&mut t).unwrap().expect("a's slot, free now");
        assert_eq!(first.addr, a);
        host.connected(&mut t);
        host.established(&mut t);
        // Time passes, so a place taken again would have a later deadline.
        std::thread::sleep(Duration::from_millis(2));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let next = host.first_bytes_failed(&mut t, reset).unwrap();
        assert!(next.is_none(), "b is full: it waits on");
        assert_eq!(
            deadline(&t),
            Some(until),
            "the same place, with its deadline"
        );
        assert_eq!(queue.waiting(), 1);
        drop(held_b);
        let second = host.retry(&mut t).unwrap().expect("b's slot, free now");
        assert_eq!(second.addr, b);
        host.connected(&mut t);
        host.established(&mut t);
        assert_eq!(
            queue.waiting(),
            1,
            "in the queue until its first bytes are out"
        );
        host.relaying(&mut t);
        assert_eq!(
            (deadline(&t), queue.waiting()),
            (None, 0),
            "out of the queue"
        );
    }

    /// A ring worker given an address whose service is not (or no longer) the ring's: a reload
    /// moved the address off the ring, and the worker's accept completed before it unlistened.
    /// The client is handed to the tokio workers, which relay it with the routes the reload left,
    /// rather than relayed on the ring (which would ignore what the service now asks: TLS, a shared
    /// address's routes) or closed. Both for an address of one `epoll` service, and for a shared
    /// one, whose client (no TLS hello) goes to its default route.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_of_an_address_off_the_ring_goes_to_the_tokio_workers() {
        if let Err(why) = ring::availability() {
            eprintln!("skipped: no ring worker here: {why}");
            return;
        }
        for shared in [false, true] {
            let backend = echo().await;
            let mut yaml = format!(
                "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: epoll\n    backends: [{{address: \"{backend}\"}}]\n"
            );
            if shared {
                yaml += "  - name: named\n    listen: 127.0.0.1:0\n    sni: [a.example]\n    backends: [{address: \"127.0.0.1:9\"}]\n";
            }
            let (routes, web) = routes_of(&yaml);
            assert_eq!(routes.load().table.only().is_none(), shared);
            let (gate, tracker) = (Arc::new(Gate::new(None)), TaskTracker::new());
            let tokio = vec![tokio::runtime::Handle::current()];
            let leaving = Arc::new(Leaving::default());
            let ring = RingWorkers::start(1, gate, tracker.clone(), leaving, tokio).unwrap();
            let (client, stop) = relayed_client(&ring, routes).await;
            drop(client);
            tokio::time::timeout(Duration::from_secs(10), async {
                while !tracker.is_empty() || web.stats.ended(Outcome::ClientClosed) == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the connection ends within 10 s");
            let accepted: u64 = ring.views().iter().map(|v| v.accepted).sum();
            assert_eq!(accepted, 1, "the ring worker accepted it");
            assert_eq!(web.stats.accepted.load(Relaxed), 1);
            assert_eq!(
                web.stats.uring.load(Relaxed),
                0,
                "relayed by a tokio worker, not on the ring (shared: {shared})"
            );
            stop.cancel();
            tokio::task::spawn_blocking(move || ring.stop())
                .await
                .unwrap();
        }
    }

    /// reliability.md `uring-enter-refused`: a ring worker whose `io_uring_enter` is refused (a
    /// seccomp filter on its thread alone, installed before its ring is made: setup and register
    /// pass, every enter fails with EPERM) takes its commands all the same, gives its listener to
    /// the tokio workers after `ENTER_GIVE_UP` failures, with an error in the log, and stops when
    /// told. The client is relayed, by a tokio worker. Before, such a worker never heard of the
    /// listener (commands come through the ring), no client was accepted, and its stop hung.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_cannot_enter_its_ring_gives_its_listeners_to_epoll() {
        if let Err(why) = ring::availability() {
            eprintln!("skipped: no ring worker here: {why}");
            return;
        }
        let backend = echo().await;
        let (routes, web) = routes_of(&format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: ring\n    backends: [{{address: \"{backend}\"}}]\n"
        ));
        let ring = RingWorkers::start_each(
            1,
            Arc::new(Gate::new(None)),
            TaskTracker::new(),
            Arc::new(Leaving::default()),
            vec![tokio::runtime::Handle::current()],
            |_, services| {
                let make = move || {
                    crate::relay::uring::refuse_enter_on_this_thread().expect("a seccomp filter");
                    services
                };
                ring::start("sg-test-noenter".into(), make, ring::TICK)
            },
        )
        .unwrap();
        let (client, stop) = relayed_client(&ring, routes).await;
        assert_eq!(ring.views()[0].accepted, 0, "nothing accepted on the ring");
        assert_eq!(web.stats.accepted.load(Relaxed), 1);
        assert_eq!(
            web.stats.uring.load(Relaxed),
            0,
            "relayed by a tokio worker"
        );
        drop(client);
        stop.cancel();
        let stopped = tokio::task::spawn_blocking(move || ring.stop());
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the worker stopped within 10 s")
            .unwrap();
    }
}
