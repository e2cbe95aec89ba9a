//! Power of two choices: draw two distinct backends at random (in proportion to weight), keep the one with
//! fewer active connections per unit of weight. Close to least-connections' balance without every pick
//! scanning the pool, and without the herd that a stale least-loaded view sends to one backend.

use std::net::SocketAddr;

use super::{allowed, less_loaded, Balancer, Candidate};
use crate::util::Rng;

pub(crate) struct P2c {
    /// Cumulative weights: backend i owns draws in `prefix[i] - weight_i .. prefix[i]`.
    prefix: Vec<u64>,
    rng: Rng,
}

impl P2c {
    pub(crate) fn new<C: Candidate>(ready: &[C], rng: Rng) -> P2c {
        let mut sum = 0;
        let prefix = ready
            .iter()
            .map(|b| {
                sum += b.weight_units() as u64;
                sum
            })
            .collect();
        P2c { prefix, rng }
    }

    fn owner(&self, draw: u64) -> usize {
        self.prefix.partition_point(|&p| p <= draw)
    }

    fn weight(&self, i: usize) -> u64 {
        self.prefix[i] - if i == 0 { 0 } else { self.prefix[i - 1] }
    }

    /// Two distinct weighted draws over the whole snapshot.
    fn two(&self) -> (usize, usize) {
        let total = *self.prefix.last().unwrap_or(&0);
        let a = self.owner(self.rng.below(total));
        let mut d = self.rng.below(total - self.weight(a));
        if d >= self.prefix[a] - self.weight(a) {
            d += self.weight(a); // skip a's range so the second draw is distinct
        }
        (a, self.owner(d))
    }
}

impl<C: Candidate> Balancer<C> for P2c {
    fn pick(&self, ready: &[C], _client: SocketAddr, avoid: &[SocketAddr]) -> Option<usize> {
        match ready.len() {
            0 => return None,
            1 => return allowed(&ready[0], avoid).then_some(0),
            _ => {}
        }
        // The two draws, unless a retry must avoid some or a draw hit a backend ejected since the
        // snapshot was built.
        let drawn = avoid
            .is_empty()
            .then(|| self.two())
            .filter(|&(a, b)| ready[a].available() && ready[b].available());
        let (a, b) = if let Some(pair) = drawn {
            pair
        } else {
            // Rare path: draw among the backends that may still be picked.
            let left: Vec<usize> = (0..ready.len())
                .filter(|&i| allowed(&ready[i], avoid))
                .collect();
            match left.len() {
                0 => return None,
                1 => return Some(left[0]),
                n => {
                    let a = self.rng.below(n as u64) as usize;
                    let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                    (left[a], left[b])
                }
            }
        };
        let (aa, ba) = (ready[a].active(), ready[b].active());
        Some(if less_loaded(&ready[b], ba, &ready[a], aa).is_lt() {
            b
        } else {
            a
        })
    }

    /// The draw is random, so no answer is what the next pick gives; the least loaded backend per unit
    /// of weight (heaviest first among equals) is what p2c leans to, and costs no draw.
    fn peek(&self, ready: &[C], _client: SocketAddr) -> Option<usize> {
        (0..ready.len())
            .filter(|&i| allowed(&ready[i], &[]))
            .min_by(|&i, &j| {
                less_loaded(&ready[i], ready[i].active(), &ready[j], ready[j].active())
                    .then(ready[j].weight_units().cmp(&ready[i].weight_units()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn contract() {
        let b = backends(&[1, 1]);
        let p = P2c::new(&b, Rng::seeded(1));
        assert_eq!(p.peek(&b, client(1)), p.peek(&b, client(1)));
        let _busy = Open::new(b[0].clone());
        assert_eq!(p.peek(&b, client(1)), Some(1), "the least loaded");
    }

    #[test]
    fn contract_of_pick() {
        let none = backends(&[]);
        assert_eq!(
            P2c::new(&none, Rng::seeded(1)).pick(&none, client(1), &[]),
            None
        );
        let three = backends(&[1, 1, 1]);
        let p = P2c::new(&three, Rng::seeded(1));
        let all: Vec<_> = three.iter().map(|b| b.addr).collect();
        assert_eq!(p.pick(&three, client(1), &all), None);
        for i in 0..30 {
            assert_eq!(p.pick(&three, client(i), &all[..2]), Some(2));
        }
    }

    #[test]
    fn the_two_draws_are_distinct() {
        let r = backends(&[1, 100, 1]);
        let p = P2c::new(&r, Rng::seeded(3));
        for _ in 0..10_000 {
            let (a, b) = p.two();
            assert_ne!(a, b);
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_three() {
        // With two distinct draws out of three, the single most loaded backend always loses.
        let r = backends(&[1, 1, 1]);
        let p = P2c::new(&r, Rng::seeded(5));
        let _g: Vec<_> = (0..5).map(|_| Open::new(r[1].clone())).collect();
        for i in 0..1000 {
            assert_ne!(p.pick(&r, client(i), &[]), Some(1));
        }
    }

    #[test]
    fn sequential_traffic_follows_weights() {
        let r = backends(&[1, 2, 7]);
        let s = shares(&P2c::new(&r, Rng::seeded(11)), &r, 10_000);
        // Idle backends tie, so the first weighted draw wins: shares ≈ weights.
        for (got, want) in s.iter().zip([1000, 2000, 7000]) {
            assert!((*got as i64 - want).abs() < 300, "{s:?}");
        }
    }
}
