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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

pub use least_conn::LeastConn;
pub use p2c::P2c;
pub use round_robin::RoundRobin;
pub use source_hash::SourceHash;
pub use weighted_round_robin::WeightedRoundRobin;

use crate::config::Policy;
use crate::pool::Backend;

/// A selection policy over one snapshot's ready backends.
pub trait Balancer: Send + Sync {
    /// Index into `ready` of the chosen backend, never one whose address is in `avoid`; `None` when no
    /// backend qualifies.
    fn pick(
        &self,
        ready: &[Arc<Backend>],
        client: SocketAddr,
        avoid: &[SocketAddr],
    ) -> Option<usize>;
}

/// The configured policy, dispatched statically.
pub enum Selector {
    RoundRobin(RoundRobin),
    WeightedRoundRobin(WeightedRoundRobin),
    LeastConn(LeastConn),
    P2c(P2c),
    SourceHash(SourceHash),
}

impl Selector {
    pub fn new(policy: Policy, ready: &[Arc<Backend>]) -> Selector {
        match policy {
            Policy::RoundRobin => Selector::RoundRobin(RoundRobin::new(ready)),
            Policy::WeightedRoundRobin => {
                Selector::WeightedRoundRobin(WeightedRoundRobin::new(ready))
            }
            Policy::LeastConn => Selector::LeastConn(LeastConn::new(ready)),
            Policy::P2c => Selector::P2c(P2c::new(ready, Rng::from_entropy())),
            Policy::SourceHash => Selector::SourceHash(SourceHash::new(ready)),
        }
    }

    pub fn pick(
        &self,
        ready: &[Arc<Backend>],
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
}

#[inline]
fn allowed(b: &Backend, avoid: &[SocketAddr]) -> bool {
    avoid.is_empty() || !avoid.contains(&b.addr)
}

/// A shared, lock-free random source (SplitMix64 over an atomic counter): one `fetch_add` per draw, so
/// threads never wait on each other and a fixed seed gives a fixed sequence in a single-threaded test.
#[derive(Debug)]
pub struct Rng(AtomicU64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    pub fn from_entropy() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        Rng::seeded(t ^ ((&local as *const u8 as u64).rotate_left(32)))
    }

    pub fn next_u64(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (no modulo bias worth measuring at these sizes).
    pub fn below(&self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// `a.active / a.weight < b.active / b.weight`, compared without division.
#[inline]
fn less_loaded(a: &Backend, a_active: u64, b: &Backend, b_active: u64) -> std::cmp::Ordering {
    (a_active as u128 * b.eff_weight() as u128).cmp(&(b_active as u128 * a.eff_weight() as u128))
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(Backend::new(
                    SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                    w,
                ))
            })
            .collect()
    }

    pub fn client(n: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + n), 40000))
    }

    /// Counts picks per backend over `n` sequential picks (each connection ends before the next).
    pub fn shares(b: &dyn Balancer, ready: &[Arc<Backend>], n: u32) -> Vec<u32> {
        let mut counts = vec![0; ready.len()];
        for i in 0..n {
            counts[b.pick(ready, client(i), &[]).unwrap()] += 1;
        }
        counts
    }

    /// Every policy: empty → None, one backend → it, avoid everything → None.
    pub fn basic_contract(make: impl Fn(&[Arc<Backend>]) -> Box<dyn Balancer>) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let a = Rng::seeded(7);
        let b = Rng::seeded(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut seen = [false; 5];
        for _ in 0..1000 {
            seen[a.below(5) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
