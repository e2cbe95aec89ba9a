//! Smooth weighted round-robin (nginx's): each backend gets picks in proportion to its weight, spread
//! evenly through the period instead of in bursts (1:2:7 gives c b c c a c b c c c, not a b b c c c c c c c).
//!
//! nginx runs the algorithm under its worker's single thread. Here the whole period (the sum of the
//! weights, divided by their gcd) is computed once per snapshot and an atomic cursor walks it, which
//! gives the same sequence with no lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{allowed, Balancer, Candidate};

pub(crate) struct WeightedRoundRobin {
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl WeightedRoundRobin {
    pub(crate) fn new<C: Candidate>(ready: &[C]) -> WeightedRoundRobin {
        WeightedRoundRobin {
            schedule: smooth_schedule(ready),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The period, for policies that break ties by weight.
    pub(crate) fn schedule(&self) -> &[u32] {
        &self.schedule
    }

    /// The next position in the period; successive calls walk it.
    pub(crate) fn advance(&self) -> usize {
        self.cursor.fetch_add(1, Relaxed)
    }
}

impl<C: Candidate> Balancer<C> for WeightedRoundRobin {
    fn pick(&self, ready: &[C], _client: SocketAddr, avoid: &[SocketAddr]) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.advance();
        (0..len)
            .map(|k| self.schedule[(start + k) % len] as usize)
            .find(|&i| allowed(&ready[i], avoid))
    }
}

/// Longest schedule kept per snapshot.
const MAX_PERIOD: i64 = 1 << 16;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One period of nginx's smooth weighted round-robin over `ready`.
fn smooth_schedule<C: Candidate>(ready: &[C]) -> Vec<u32> {
    let g = ready
        .iter()
        .fold(0u64, |g, b| gcd(g, b.weight_units() as u64))
        .max(1);
    let mut weights: Vec<i64> = ready
        .iter()
        .map(|b| (b.weight_units() as u64 / g) as i64)
        .collect();
    let sum: i64 = weights.iter().sum();
    if sum > MAX_PERIOD {
        // Slow start can make the weights coprime and the period huge: scale it down, keeping every
        // backend in it (shares move by at most 1/MAX_PERIOD each).
        for w in &mut weights {
            *w = (*w * MAX_PERIOD / sum).max(1);
        }
    }
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; ready.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn contract() {
        basic_contract(|r| Box::new(WeightedRoundRobin::new(r)));
    }

    #[test]
    fn shares_follow_weights_exactly() {
        let r = backends(&[1, 2, 7]);
        assert_eq!(
            shares(&WeightedRoundRobin::new(&r), &r, 10_000),
            vec![1000, 2000, 7000]
        );
    }

    #[test]
    fn picks_are_spread_not_bursty() {
        let r = backends(&[5, 1, 1]);
        let s = WeightedRoundRobin::new(&r).schedule().to_vec();
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0], "nginx's sequence for 5:1:1");
    }

    #[test]
    fn period_is_reduced_by_gcd() {
        let r = backends(&[100, 200]);
        assert_eq!(WeightedRoundRobin::new(&r).schedule().len(), 3);
    }

    #[test]
    fn removal_renormalises() {
        let r = backends(&[1, 2, 7]);
        let without_heavy: Vec<_> = r[..2].to_vec();
        assert_eq!(
            shares(
                &WeightedRoundRobin::new(&without_heavy),
                &without_heavy,
                300
            ),
            vec![100, 200]
        );
    }
}
