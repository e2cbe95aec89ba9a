//! The ring worker threads, one per core, started when the first service goes on the ring: each
//! runs the loop of `ring/mod.rs` with its own [`Services`] host (`host.rs`); what the control plane
//! asks of them (listen on an address, stop listening, cut, carry, adopt a carried connection,
//! stop), every worker's handle for the others (a slot freed on one wakes the waiters on all), and
//! their counters as `/metrics` shows them ([`METRICS`]).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use super::host::{Services, Taken};
use crate::admission::Gate;
use crate::metrics::{Family, Kind, Subject, Table};
use crate::outcome::Outcome;
use crate::pool::{Backend, CutSignal};
use crate::ring::{self, Adopt, Command, Timeouts};
use crate::route::Routes;
use crate::service::Service;
use crate::session::{Carried, Leaving};
use crate::util::lock;

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
    pub(super) routes: Arc<ArcSwap<Routes>>,
    pub(super) local: Arc<str>,
    /// The address's stop, for an accept loop that takes over from a worker that cannot enter its
    /// ring (`Host::enter_refused`).
    pub(super) stop: CancellationToken,
    pub(super) accepting: TaskTrackerToken,
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
    pub(super) fn start_each(
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
        let listen: Arc<str> = carried
            .client
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
            .into();
        let taken = Taken::carried_in(&facts, service, &self.workers, gate, tracker, &listen);
        let timeouts = Timeouts::of(taken.relay_options());
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

/// Every ring worker's handle (set once they have all started), so a slot freed on one reaches
/// the connections waiting for one on any. Emptied when the workers stop: each worker holds this,
/// and a handle in it would keep the worker's own channel open.
#[derive(Default)]
pub(super) struct Workers(pub(super) Mutex<Vec<ring::Handle<Served, Taken>>>);

impl Workers {
    /// What a service's queue calls when a slot comes free, on either data plane
    /// ([`Queue::wake_with`]): every worker's waiting connections look again.
    pub(super) fn freed_call(self: &Arc<Self>) -> Arc<dyn Fn() + Send + Sync> {
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

    /// What has every worker look at its connections' cuts now (`Command::BackendCut`): for an
    /// operator's kill of one of their connections (`connections::Conn::wake_with`).
    pub(super) fn look_waker(self: &Arc<Self>) -> Arc<dyn Fn() + Send + Sync> {
        // Weak: a backend's signal and a connection's listing may outlive the workers.
        let workers = Arc::downgrade(self);
        Arc::new(move || {
            if let Some(w) = workers.upgrade() {
                for h in lock(&w.0).iter() {
                    h.send(Command::BackendCut);
                }
            }
        })
    }

    /// `backend`'s cut signal, set to tell every worker (`Command::BackendCut`) when it fires, so
    /// its connections are cut at once rather than on a worker's next tick.
    pub(super) fn cut_signal(self: &Arc<Self>, backend: &Backend) -> Arc<CutSignal> {
        let cut = backend.cut_signal();
        cut.wake_with(|| self.look_waker());
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::events::EventBus;
    use crate::listener;
    use crate::pool::ActiveGuard;
    use crate::ring::{Admit, Host};
    use crate::route::{Table, Unrouted};
    use crate::tls::ServiceTls;
    use std::net::SocketAddr;
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
        if crate::relay::uring::missing_in_test() {
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
        if crate::relay::uring::missing_in_test() {
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
        if crate::relay::uring::missing_in_test() {
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
        if crate::relay::uring::missing_in_test() {
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
            assert_eq!(web.stats.accepted_total(), 1);
            assert_eq!(
                web.stats.ring_total(),
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
        if crate::relay::uring::missing_in_test() {
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
        assert_eq!(web.stats.accepted_total(), 1);
        assert_eq!(web.stats.ring_total(), 0, "relayed by a tokio worker");
        drop(client);
        stop.cancel();
        let stopped = tokio::task::spawn_blocking(move || ring.stop());
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the worker stopped within 10 s")
            .unwrap();
    }
}
