//! Plain round-robin: every ready backend in turn, weights ignored.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{allowed, Balancer, Candidate};

pub(crate) struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub(crate) fn new<C: Candidate>(_ready: &[C]) -> RoundRobin {
        RoundRobin {
            next: AtomicUsize::new(0),
        }
    }
}

impl<C: Candidate> Balancer<C> for RoundRobin {
    fn pick(&self, ready: &[C], _client: SocketAddr, avoid: &[SocketAddr]) -> Option<usize> {
        let n = ready.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| allowed(&ready[i], avoid))
    }

    fn peek(&self, ready: &[C], _client: SocketAddr) -> Option<usize> {
        let (n, start) = (ready.len(), self.next.load(Relaxed));
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| allowed(&ready[i], &[]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn contract() {
        basic_contract(|r| Box::new(RoundRobin::new(r)));
    }

    #[test]
    fn equal_shares_whatever_the_weights() {
        let r = backends(&[1, 5, 10]);
        assert_eq!(shares(&RoundRobin::new(&r), &r, 300), vec![100, 100, 100]);
    }

    #[test]
    fn removal_keeps_rotating_over_the_rest() {
        let r = backends(&[1, 1, 1, 1]);
        let smaller: Vec<_> = r[1..].to_vec();
        assert_eq!(
            shares(&RoundRobin::new(&smaller), &smaller, 30),
            vec![10, 10, 10]
        );
    }
}
