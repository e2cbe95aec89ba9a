//! Choosing a backend for a new connection.
//!
//! Each policy is a small synchronous [`Balancer`] built once per pool snapshot from the ready backends
//! (its schedule, table or prefix sums are computed there, off the hot path) and then asked to `pick`
//! without locks or allocation. An empty ready set yields `None`; `avoid` lists addresses already tried
//! by this connection so a retry lands on a different backend. Randomness is injected ([`Rng`]) so tests
//! can seed it.

mod least_conn;
mod p2c;
mod round_robin;
mod source_hash;
mod weighted_round_robin;

use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) use least_conn::LeastConn;
pub(crate) use p2c::P2c;
pub(crate) use round_robin::RoundRobin;
pub(crate) use source_hash::SourceHash;
pub(crate) use weighted_round_robin::WeightedRoundRobin;

use crate::config::Policy;
use crate::util::Rng;

/// What a policy needs to know of a backend. The pool's backends implement it; the policies never see
/// more, so they can be read and tested without a pool.
pub(crate) trait Candidate {
    fn addr(&self) -> SocketAddr;
    /// The configured weight (what `source_hash`'s table uses: never slow start's).
    fn weight(&self) -> u32;
    /// The weight in use now, in the pool's fixed-point units (slow start lowers it).
    fn weight_units(&self) -> u32;
    /// Connections open (or connecting) to it now.
    fn active(&self) -> u64;
    /// False once it is passively ejected: a worker that saw its connects fail flips this at once,
    /// and the snapshot without it is built later on the control runtime, so every policy skips an
    /// unavailable backend until then.
    fn available(&self) -> bool {
        true
    }
}

impl<T: Candidate + ?Sized> Candidate for Arc<T> {
    #[inline]
    fn addr(&self) -> SocketAddr {
        (**self).addr()
    }
    #[inline]
    fn weight(&self) -> u32 {
        (**self).weight()
    }
    #[inline]
    fn weight_units(&self) -> u32 {
        (**self).weight_units()
    }
    #[inline]
    fn active(&self) -> u64 {
        (**self).active()
    }
    #[inline]
    fn available(&self) -> bool {
        (**self).available()
    }
}

/// A selection policy over one snapshot's ready backends.
pub(crate) trait Balancer<C: Candidate> {
    /// Index into `ready` of the chosen backend, never one whose address is in `avoid`; `None` when no
    /// backend qualifies.
    fn pick(&self, ready: &[C], client: SocketAddr, avoid: &[SocketAddr]) -> Option<usize>;

    /// What `pick` would answer for `client` now, moving nothing: no cursor advanced, no random draw
    /// spent (`GET /route` asks without sending a connection). Policies without state to move answer
    /// as `pick` does; a random one (p2c) answers what it leans to, not what its next draw gives.
    fn peek(&self, ready: &[C], client: SocketAddr) -> Option<usize> {
        self.pick(ready, client, &[])
    }
}

/// The configured policy, dispatched statically.
pub(crate) enum Selector {
    RoundRobin(RoundRobin),
    WeightedRoundRobin(WeightedRoundRobin),
    LeastConn(LeastConn),
    P2c(P2c),
    SourceHash(SourceHash),
}

impl Selector {
    /// The policy over the backends ready now. `source_hash` indexes every member instead: see
    /// [`Selector::over_members`].
    pub(crate) fn over_ready<C: Candidate>(policy: Policy, ready: &[C]) -> Selector {
        match policy {
            Policy::RoundRobin => Selector::RoundRobin(RoundRobin::new(ready)),
            Policy::WeightedRoundRobin => {
                Selector::WeightedRoundRobin(WeightedRoundRobin::new(ready))
            }
            Policy::LeastConn => Selector::LeastConn(LeastConn::new(ready)),
            Policy::P2c => Selector::P2c(P2c::new(ready, Rng::from_entropy())),
            Policy::SourceHash => {
                let all = vec![true; ready.len()];
                Selector::SourceHash(SourceHash::new(ready, all))
            }
        }
    }

    /// `source_hash` over every member (sorted by address), `eligible` saying which may take new
    /// connections: the table depends on the members alone, so balancers with the same members agree.
    pub(crate) fn over_members<C: Candidate>(members: &[C], eligible: Vec<bool>) -> Selector {
        Selector::SourceHash(SourceHash::new(members, eligible))
    }

    #[inline]
    pub(crate) fn pick<C: Candidate>(
        &self,
        ready: &[C],
        client: SocketAddr,
        avoid: &[SocketAddr],
    ) -> Option<usize> {
        match self {
            Selector::RoundRobin(b) => b.pick(ready, client, avoid),
            Selector::WeightedRoundRobin(b) => b.pick(ready, client, avoid),
            Selector::LeastConn(b) => b.pick(ready, client, avoid),
            Selector::P2c(b) => b.pick(ready, client, avoid),
            Selector::SourceHash(b) => b.pick(ready, client, avoid),
        }
    }

    /// See [`Balancer::peek`].
    pub(crate) fn peek<C: Candidate>(&self, ready: &[C], client: SocketAddr) -> Option<usize> {
        match self {
            Selector::RoundRobin(b) => b.peek(ready, client),
            Selector::WeightedRoundRobin(b) => b.peek(ready, client),
            Selector::LeastConn(b) => b.peek(ready, client),
            Selector::P2c(b) => b.peek(ready, client),
            Selector::SourceHash(b) => b.peek(ready, client),
        }
    }
}

/// Whether `b` may be picked: available now and not tried already.
#[inline]
fn allowed<C: Candidate>(b: &C, avoid: &[SocketAddr]) -> bool {
    b.available() && (avoid.is_empty() || !avoid.contains(&b.addr()))
}

/// `a.active / a.weight < b.active / b.weight`, compared without division.
#[inline]
fn less_loaded<C: Candidate>(a: &C, a_active: u64, b: &C, b_active: u64) -> std::cmp::Ordering {
    (a_active as u128 * b.weight_units() as u128)
        .cmp(&(b_active as u128 * a.weight_units() as u128))
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// A backend as the policies see it, with an open-connection count the test sets.
    #[derive(Debug)]
    pub(crate) struct TestBackend {
        pub(crate) addr: SocketAddr,
        pub(crate) weight: u32,
        /// The weight in use (below `weight` while slow-starting).
        pub(crate) effective: std::sync::atomic::AtomicU32,
        pub(crate) active: AtomicU64,
        /// Cleared to stand for a backend ejected after the policy was built.
        pub(crate) available: std::sync::atomic::AtomicBool,
    }

    impl Candidate for TestBackend {
        fn addr(&self) -> SocketAddr {
            self.addr
        }
        fn weight(&self) -> u32 {
            self.weight
        }
        fn weight_units(&self) -> u32 {
            self.effective.load(Relaxed)
        }
        fn active(&self) -> u64 {
            self.active.load(Relaxed)
        }
        fn available(&self) -> bool {
            self.available.load(Relaxed)
        }
    }

    /// One open connection to a test backend, while it lives.
    pub(crate) struct Open(Arc<TestBackend>);

    impl Open {
        pub(crate) fn new(b: Arc<TestBackend>) -> Open {
            b.active.fetch_add(1, Relaxed);
            Open(b)
        }
    }

    impl Drop for Open {
        fn drop(&mut self) {
            self.0.active.fetch_sub(1, Relaxed);
        }
    }

    pub(crate) fn backends(weights: &[u32]) -> Vec<Arc<TestBackend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(TestBackend {
                    addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                    weight: w,
                    effective: std::sync::atomic::AtomicU32::new(w),
                    active: AtomicU64::new(0),
                    available: std::sync::atomic::AtomicBool::new(true),
                })
            })
            .collect()
    }

    pub(crate) fn client(n: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + n), 40000))
    }

    type Ready = [Arc<TestBackend>];

    /// Counts picks per backend over `n` sequential picks (each connection ends before the next).
    pub(crate) fn shares(b: &dyn Balancer<Arc<TestBackend>>, ready: &Ready, n: u32) -> Vec<u32> {
        let mut counts = vec![0; ready.len()];
        for i in 0..n {
            counts[b.pick(ready, client(i), &[]).unwrap()] += 1;
        }
        counts
    }

    /// Every policy: empty → None, one backend → it, avoid everything → None.
    pub(crate) fn basic_contract(make: impl Fn(&Ready) -> Box<dyn Balancer<Arc<TestBackend>>>) {
        let none = backends(&[]);
        assert_eq!(make(&none).pick(&none, client(1), &[]), None);
        let one = backends(&[5]);
        let b = make(&one);
        for i in 0..10 {
            assert_eq!(b.pick(&one, client(i), &[]), Some(0));
        }
        assert_eq!(b.pick(&one, client(1), &[one[0].addr]), None);
        let three = backends(&[1, 1, 1]);
        let b = make(&three);
        let all: Vec<_> = three.iter().map(|b| b.addr).collect();
        assert_eq!(b.pick(&three, client(1), &all), None);
        for i in 0..30 {
            let got = b.pick(&three, client(i), &all[..2]).unwrap();
            assert_eq!(got, 2, "avoid must be honoured");
        }
        // peek: the same answer however often asked, and what the next pick then gives.
        let fresh = make(&three);
        for i in 0..5 {
            let peeked = fresh.peek(&three, client(i));
            assert!(peeked.is_some());
            assert_eq!(fresh.peek(&three, client(i)), peeked, "peek moves nothing");
            assert_eq!(
                fresh.pick(&three, client(i), &[]),
                peeked,
                "then the pick agrees"
            );
        }
        assert_eq!(make(&none).peek(&none, client(1)), None);
        // A backend ejected after the policy was built is skipped at once, on first tries and
        // retries alike; with none left there is no pick.
        three[1].available.store(false, Relaxed);
        for i in 0..30 {
            assert_ne!(b.pick(&three, client(i), &[]), Some(1), "ejected: skipped");
            assert_eq!(b.pick(&three, client(i), &all[..1]), Some(2));
        }
        three[0].available.store(false, Relaxed);
        three[2].available.store(false, Relaxed);
        assert_eq!(b.pick(&three, client(1), &[]), None);
    }
}
