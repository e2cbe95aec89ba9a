//! The process's live connections, for the operator (`GET /connections`, `DELETE /connections`): one
//! [`Conn`] per open client connection or UDP session, in the [`Registry`] from the moment its
//! service takes it until it ends, on every engine.
//!
//! The data plane writes a connection's view as it goes (its bytes at each write, its state, the
//! facts of its routing once known) and looks at its kill request where it already looks for a cut;
//! the admin API reads the views and asks for kills. The registry is sharded by id, so the data
//! plane's threads rarely meet on one lock, and a listing holds each shard's lock only to copy
//! its handles out: listing 100,000 connections keeps no data-plane thread waiting for more than a
//! shard's copy.
//!
//! One registry per process ([`registry`]): an id is unique in the process, as the API promises, and
//! every engine and the admin API reach it without each service carrying it (a reloaded service's
//! connections stay listed under the old service object they keep).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

const SHARDS: usize = 16;
/// Handles copied per hold of a shard's lock by a listing.
const CHUNK: usize = 256;

/// Every live connection of the process, by id.
pub(crate) struct Registry {
    next: AtomicU64,
    shards: [Mutex<BTreeMap<u64, Arc<Conn>>>; SHARDS],
}

/// The process's registry.
pub(crate) fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        next: AtomicU64::new(1),
        shards: Default::default(),
    })
}

impl Registry {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection its service has just taken; it is listed until [`Registered`] drops.
    pub(crate) fn enter(&'static self, opened: Opened) -> Registered {
        let id = self.next.fetch_add(1, Relaxed);
        let conn = Arc::new(Conn::new(id, opened));
        self.shard(id).insert(id, conn.clone());
        Registered {
            registry: self,
            conn,
        }
    }

    /// Calls `f` on every live connection, in no set order, a chunk at a time: a shard's lock is
    /// held only while at most [`CHUNK`] handles are copied, and `f` runs on them with no lock
    /// held, so a data-plane thread waiting to open or close a connection takes the lock between
    /// two chunks, whatever the count (benchmarks/console_listing.py measures it).
    pub(crate) fn each(&self, mut f: impl FnMut(Arc<Conn>)) {
        let mut chunk: Vec<Arc<Conn>> = Vec::with_capacity(CHUNK);
        for shard in &self.shards {
            let mut from = 0;
            loop {
                let s = shard.lock().unwrap_or_else(|e| e.into_inner());
                chunk.extend(s.range(from..).take(CHUNK).map(|(_, c)| c.clone()));
                drop(s);
                let full = chunk.len() == CHUNK;
                if let Some(last) = chunk.last() {
                    from = last.id + 1;
                }
                chunk.drain(..).for_each(&mut f);
                if !full {
                    break;
                }
            }
        }
    }

    /// Every live connection, newest first.
    pub(crate) fn all(&self) -> Vec<Arc<Conn>> {
        let mut out = Vec::new();
        self.each(|c| out.push(c));
        out.sort_unstable_by_key(|c| std::cmp::Reverse(c.id));
        out
    }

    /// The connection with this id, while it lives.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Conn>> {
        self.shard(id).get(&id).cloned()
    }
}

/// A connection's place in the registry: it leaves when this drops (its connection ended).
pub(crate) struct Registered {
    registry: &'static Registry,
    conn: Arc<Conn>,
}

impl Registered {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.shard(self.conn.id).remove(&self.conn.id);
    }
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("id", &self.conn.id)
            .finish()
    }
}

/// What is known of a connection when its service takes it.
pub(crate) struct Opened {
    pub(crate) protocol: Protocol,
    pub(crate) service: Arc<str>,
    pub(crate) client: SocketAddr,
    /// The listen address it reached: the listener's bound address for a new TCP connection (a
    /// wildcard stays one), the exact local address for a carried one and a UDP session.
    pub(crate) listen: Arc<str>,
    pub(crate) engine: &'static str,
    /// Carried in from the process this one replaced; how long it had been open there.
    pub(crate) handed_over: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Taken by its service; admitting, reading a header or handshake, waiting for a backend or
    /// connecting to one.
    Connecting = 0,
    /// Both sides open, bytes moving either way.
    Relaying = 1,
    /// One side has sent its end of stream; the other direction goes on.
    HalfClosed = 2,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Relaying => "relaying",
            State::HalfClosed => "half_closed",
        }
    }

    fn from_u8(b: u8) -> Option<State> {
        [State::Connecting, State::Relaying, State::HalfClosed]
            .into_iter()
            .find(|s| *s as u8 == b)
    }
}

/// How an operator asked for a connection to end (`DELETE /connections/{id}?how=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum How {
    /// Both sides see a reset: neither can mistake the cut for the end of the stream.
    #[default]
    Reset = 1,
    /// Both sides see an end of stream (FIN).
    Fin = 2,
}

impl How {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            How::Reset => "reset",
            How::Fin => "fin",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<How> {
        match s {
            "reset" => Some(How::Reset),
            "fin" => Some(How::Fin),
            _ => None,
        }
    }

    fn from_u8(b: u8) -> Option<How> {
        [How::Reset, How::Fin].into_iter().find(|h| *h as u8 == b)
    }
}

/// The facts of a connection's routing, written a few times on its way to the relay.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// The client, as a PROXY header named it once one was read.
    pub(crate) client: Option<SocketAddr>,
    /// The balancer in front that sent the PROXY header.
    pub(crate) via: Option<SocketAddr>,
    pub(crate) route: Option<&'static str>,
    pub(crate) sni: Option<String>,
    pub(crate) backend: Option<SocketAddr>,
    pub(crate) backend_name: Option<Arc<String>>,
    pub(crate) tier: Option<u32>,
    /// TLS terminated here, with the version agreed.
    pub(crate) tls_terminated: Option<&'static str>,
    /// TLS originated to the backend (`backend_tls`).
    pub(crate) tls_originated: bool,
    /// The engine that relays it, once known (`ring`, `epoll`, `splice`, `copy`, `tls`, `udp`).
    pub(crate) engine: Option<&'static str>,
}

/// One live connection as the operator sees it.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) protocol: Protocol,
    pub(crate) service: Arc<str>,
    pub(crate) client: SocketAddr,
    pub(crate) listen: Arc<str>,
    /// Wall-clock start, for `started` (RFC 3339).
    pub(crate) started: SystemTime,
    /// Monotonic start, for `age_s`.
    pub(crate) born: Instant,
    pub(crate) handed_over: bool,
    engine: &'static str,
    facts: Mutex<Facts>,
    state: AtomicU8,
    up: AtomicU64,
    down: AtomicU64,
    /// When bytes last moved, as the relay's coarse clock stamps it (`relay::clock`); the start's
    /// until then.
    active: AtomicU64,
    /// 0, or the [`How`] an operator asked it to end.
    kill: AtomicU8,
    /// The tokio session's task, woken by a kill: kept here rather than as a future in every
    /// connection's task, which would grow each by a cancellation future's room.
    killed: AtomicWaker,
    /// How a loop that looks rather than waits (a ring worker) is told to look now.
    wake: OnceLock<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("service", &self.service)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn new(id: u64, o: Opened) -> Conn {
        let born = Instant::now();
        let age = o.handed_over.unwrap_or_default();
        Conn {
            id,
            protocol: o.protocol,
            service: o.service,
            client: o.client,
            listen: o.listen,
            started: SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::now()),
            born: born.checked_sub(age).unwrap_or(born),
            handed_over: o.handed_over.is_some(),
            engine: o.engine,
            facts: Mutex::new(Facts::default()),
            state: AtomicU8::new(State::Connecting as u8),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            active: AtomicU64::new(0),
            kill: AtomicU8::new(0),
            killed: AtomicWaker::new(),
            wake: OnceLock::new(),
        }
    }

    /// The facts of its routing so far.
    pub(crate) fn facts(&self) -> Facts {
        self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the facts of its routing (on its way to the relay, as they become known).
    pub(crate) fn set_facts(&self, f: Facts) {
        *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// The engine that relays it: the one its facts name, else the one that took it.
    pub(crate) fn engine(&self, facts: &Facts) -> &'static str {
        facts.engine.unwrap_or(self.engine)
    }

    pub(crate) fn state(&self) -> State {
        State::from_u8(self.state.load(Relaxed)).unwrap_or(State::Connecting)
    }

    pub(crate) fn set_state(&self, s: State) {
        self.state.store(s as u8, Relaxed);
    }

    /// Bytes moved so far: to the backend, and to the client.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.up.load(Relaxed), self.down.load(Relaxed))
    }

    /// The relay's counter of bytes sent to the backend (`up`) or to the client.
    pub(crate) fn counter(&self, up: bool) -> &AtomicU64 {
        if up {
            &self.up
        } else {
            &self.down
        }
    }

    /// Where the relay stamps its last write (`relay::clock`).
    pub(crate) fn active(&self) -> &AtomicU64 {
        &self.active
    }

    /// Bytes moved since the last call, at `stamp` (a loop that counts in batches: the ring
    /// workers at their tick, a UDP session per datagram).
    pub(crate) fn moved(&self, up: u64, down: u64, stamp: u64) {
        if up > 0 {
            self.up.fetch_add(up, Relaxed);
        }
        if down > 0 {
            self.down.fetch_add(down, Relaxed);
        }
        if up + down > 0 {
            self.active.store(stamp, Relaxed);
        }
    }

    /// Asks the connection to end `how`: true if this is the first ask. The engine ends it with
    /// `end: killed` (a tokio session at once, a ring worker when woken).
    pub(crate) fn kill(&self, how: How) -> bool {
        let first = self
            .kill
            .compare_exchange(0, how as u8, AcqRel, Acquire)
            .is_ok();
        if first {
            self.killed.wake();
            if let Some(wake) = self.wake.get() {
                wake();
            }
        }
        first
    }

    /// How an operator asked it to end, if one did.
    pub(crate) fn kill_asked(&self) -> Option<How> {
        How::from_u8(self.kill.load(Acquire))
    }

    /// Ready once an operator asks it to end; else the task of `cx` is woken when one does.
    pub(crate) fn poll_killed(&self, cx: &mut Context<'_>) -> Poll<How> {
        self.killed.register(cx.waker());
        match self.kill_asked() {
            Some(how) => Poll::Ready(how),
            None => Poll::Pending,
        }
    }

    /// Has a kill call `wake` (made on the first call only), for a loop that looks for kills
    /// rather than waits. A kill racing this call is seen by the caller's next look.
    pub(crate) fn wake_with(&self, wake: impl FnOnce() -> Arc<dyn Fn() + Send + Sync>) {
        self.wake.get_or_init(wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(client: &str) -> Opened {
        Opened {
            protocol: Protocol::Tcp,
            service: Arc::from("web"),
            client: client.parse().unwrap(),
            listen: Arc::from("127.0.0.1:80"),
            engine: "epoll",
            handed_over: None,
        }
    }

    #[tokio::test]
    async fn a_connection_is_listed_while_it_lives_newest_first() {
        let r = registry();
        let a = r.enter(opened("10.0.0.1:1000"));
        let b = r.enter(opened("10.0.0.2:1000"));
        let (ia, ib) = (a.conn().id, b.conn().id);
        assert!(ib > ia, "ids grow");
        let ids: Vec<u64> = r
            .all()
            .iter()
            .map(|c| c.id)
            .filter(|id| [ia, ib].contains(id))
            .collect();
        assert_eq!(ids, vec![ib, ia]);
        drop(a);
        assert!(r.get(ia).is_none());
        assert!(r.get(ib).is_some());
    }

    #[tokio::test]
    async fn the_first_kill_counts_and_wakes() {
        let r = registry();
        let a = r.enter(opened("10.0.0.3:1000"));
        let woken = Arc::new(AtomicU64::new(0));
        let w = woken.clone();
        a.conn().wake_with(|| {
            Arc::new(move || {
                w.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(a.conn().kill_asked(), None);
        assert!(a.conn().kill(How::Fin));
        assert!(!a.conn().kill(How::Reset), "a second ask changes nothing");
        assert_eq!(a.conn().kill_asked(), Some(How::Fin));
        assert_eq!(woken.load(Relaxed), 1);
        let how = std::future::poll_fn(|cx| a.conn().poll_killed(cx)).await;
        assert_eq!(how, How::Fin);
    }

    #[test]
    fn a_listing_in_chunks_misses_nobody() {
        let r = registry();
        // More than a chunk in every shard.
        let held: Vec<_> = (0..SHARDS * CHUNK * 2 + 5)
            .map(|i| r.enter(opened(&format!("10.1.{}.{}:1000", i / 250, i % 250))))
            .collect();
        let listed: std::collections::HashSet<u64> = r.all().iter().map(|c| c.id).collect();
        assert!(held.iter().all(|h| listed.contains(&h.conn().id)));
        let all = r.all();
        assert!(
            all.windows(2).all(|w| w[0].id > w[1].id),
            "newest first, no repeats"
        );
    }

    #[test]
    fn moved_bytes_add_up() {
        let a = registry().enter(opened("10.0.0.4:1000"));
        a.conn().moved(10, 0, 5);
        a.conn().moved(0, 7, 9);
        a.conn().counter(true).fetch_add(1, Relaxed);
        assert_eq!(a.conn().bytes(), (11, 7));
        assert_eq!(a.conn().active().load(Relaxed), 9);
    }
}
