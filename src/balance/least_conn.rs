//! Weighted least-connections: the backend with the fewest active connections per unit of weight.
//!
//! A connection counts from the start of its connect, so a backend that is slow to accept does not
//! collect every new client meanwhile. Ties, which are the normal case under light load (everyone at 0),
//! go in smooth weighted round-robin order, as in nginx, so sequential traffic still follows the weights.

use std::net::SocketAddr;

use super::{allowed, less_loaded, Balancer, Candidate, WeightedRoundRobin};

pub(crate) struct LeastConn {
    ties: WeightedRoundRobin,
}

impl LeastConn {
    pub(crate) fn new<C: Candidate>(ready: &[C]) -> LeastConn {
        LeastConn {
            ties: WeightedRoundRobin::new(ready),
        }
    }
}

impl LeastConn {
    /// The least loaded backend not in `avoid`; ties go in weighted order from position `start`.
    fn choose<C: Candidate>(
        &self,
        ready: &[C],
        avoid: &[SocketAddr],
        start: usize,
    ) -> Option<usize> {
        let mut best: Option<(usize, u64)> = None;
        for (i, b) in ready.iter().enumerate() {
            if !allowed(b, avoid) {
                continue;
            }
            let a = b.active();
            match best {
                Some((j, ja)) if less_loaded(b, a, &ready[j], ja).is_ge() => {}
                _ => best = Some((i, a)),
            }
        }
        let (min_i, min_a) = best?;
        // Among the backends as lightly loaded as the best, take the next in weighted order. Counts may
        // move under us; if no tied backend is found within one period, the first pass's answer stands.
        let schedule = self.ties.schedule();
        (0..schedule.len())
            .map(|k| schedule[(start + k) % schedule.len()] as usize)
            .find(|&i| {
                allowed(&ready[i], avoid)
                    && less_loaded(&ready[i], ready[i].active(), &ready[min_i], min_a).is_eq()
            })
            .or(Some(min_i))
    }
}

impl<C: Candidate> Balancer<C> for LeastConn {
    fn pick(&self, ready: &[C], _client: SocketAddr, avoid: &[SocketAddr]) -> Option<usize> {
        self.choose(ready, avoid, self.ties.advance())
    }

    fn peek(&self, ready: &[C], _client: SocketAddr) -> Option<usize> {
        self.choose(ready, &[], self.ties.position())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn contract() {
        basic_contract(|r| Box::new(LeastConn::new(r)));
    }

    #[test]
    fn picks_the_least_loaded() {
        let r = backends(&[1, 1, 1]);
        let b = LeastConn::new(&r);
        let _g: Vec<_> = [0, 0, 1].iter().map(|&i| Open::new(r[i].clone())).collect();
        for i in 0..10 {
            assert_eq!(b.pick(&r, client(i), &[]), Some(2));
        }
    }

    #[test]
    fn weights_scale_the_load() {
        // 4 active on a weight-4 backend is as loaded as 1 on weight 1; 3 on weight 4 is less.
        let r = backends(&[1, 4]);
        let b = LeastConn::new(&r);
        let _a = Open::new(r[0].clone());
        let g: Vec<_> = (0..3).map(|_| Open::new(r[1].clone())).collect();
        assert_eq!(b.pick(&r, client(0), &[]), Some(1));
        let _more = Open::new(r[1].clone());
        assert_eq!(g.len(), 3);
        let picks: Vec<_> = (0..5)
            .map(|i| b.pick(&r, client(i), &[]).unwrap())
            .collect();
        assert!(
            picks.contains(&0) && picks.contains(&1),
            "a tie alternates: {picks:?}"
        );
    }

    #[test]
    fn sequential_traffic_follows_weights() {
        let r = backends(&[1, 2, 7]);
        assert_eq!(
            shares(&LeastConn::new(&r), &r, 10_000),
            vec![1000, 2000, 7000]
        );
    }

    #[test]
    fn concurrent_connections_fill_evenly() {
        let r = backends(&[1, 1, 1]);
        let b = LeastConn::new(&r);
        let held: Vec<_> = (0..30)
            .map(|i| Open::new(r[b.pick(&r, client(i), &[]).unwrap()].clone()))
            .collect();
        assert!(r.iter().all(|x| x.active() == 10));
        drop(held);
    }
}
