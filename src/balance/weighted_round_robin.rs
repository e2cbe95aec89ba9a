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

    /// The position `advance` would give next, without moving.
    pub(crate) fn position(&self) -> usize {
        self.cursor.load(Relaxed)
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

    fn peek(&self, ready: &[C], _client: SocketAddr) -> Option<usize> {
        let (len, start) = (self.schedule.len(), self.position());
        (0..len)
            .map(|k| self.schedule[(start + k) % len] as usize)
            .find(|&i| allowed(&ready[i], &[]))
    }
}

/// Longest schedule kept per snapshot.
const MAX_PERIOD: i64 = 1 << 16;

/// Steps of the exact construction (the period times the number of distinct weights) beyond which
/// the schedule is built by [`stride_schedule`] instead: a few milliseconds of work at most.
const EXACT_WORK: i64 = 1 << 22;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The weights the schedule is built from: reduced by their gcd, and scaled down when their sum
/// would exceed [`MAX_PERIOD`].
fn period_weights<C: Candidate>(ready: &[C]) -> Vec<i64> {
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
    weights
}

/// One period of nginx's smooth weighted round-robin over `ready`.
fn smooth_schedule<C: Candidate>(ready: &[C]) -> Vec<u32> {
    let weights = period_weights(ready);
    let classes = weight_classes(&weights);
    let total: i64 = weights.iter().sum();
    if total.saturating_mul(classes.len() as i64) > EXACT_WORK {
        stride_schedule(&weights)
    } else {
        exact_schedule(classes, total)
    }
}

/// The backends of one weight, by index, and how many picks the class has had.
struct Class {
    weight: i64,
    members: Vec<u32>,
    picks: usize,
}

/// The backends grouped by weight, each group in index order.
fn weight_classes(weights: &[i64]) -> Vec<Class> {
    let mut by_weight: std::collections::BTreeMap<i64, Vec<u32>> = Default::default();
    for (i, &w) in weights.iter().enumerate() {
        by_weight.entry(w).or_default().push(i as u32);
    }
    by_weight
        .into_iter()
        .map(|(weight, members)| Class {
            weight,
            members,
            picks: 0,
        })
        .collect()
}

/// nginx's sequence, in O(n + period × distinct weights) instead of O(n × period).
///
/// nginx, at step `t` (from 1), adds every backend's weight to its `current` and picks the first
/// backend with the highest, which then loses `total`: so `current_i = t·w_i − total·k_i`, `k_i`
/// being its picks so far. Backends of equal weight differ only by their picks, so within a class
/// the next one is the least-picked, first by index: each class serves its members in rotation, and
/// only its head (`members[picks % m]`, with `picks / m` picks) can win. The step compares the
/// heads, first index on a tie, exactly as nginx's scan does.
fn exact_schedule(mut classes: Vec<Class>, total: i64) -> Vec<u32> {
    let mut schedule = Vec::with_capacity(total as usize);
    for t in 1..=total {
        let mut best: Option<(i64, u32, usize)> = None;
        for (ci, c) in classes.iter().enumerate() {
            let m = c.members.len();
            let value = t * c.weight - total * (c.picks / m) as i64;
            let head = c.members[c.picks % m];
            match best {
                Some((v, h, _)) if v > value || (v == value && h < head) => {}
                _ => best = Some((value, head, ci)),
            }
        }
        let Some((_, head, ci)) = best else {
            break; // no backends
        };
        classes[ci].picks += 1;
        schedule.push(head);
    }
    schedule
}

/// A smooth period for weights too diverse for [`exact_schedule`], in O(period × log n): backend
/// `i`'s `k`-th pick (from 0) is placed at `(k + ½) / w_i` of the period, earliest first, lowest
/// index on a tie. Shares are exact and each backend's picks are evenly spaced; the order differs
/// from nginx's where their placements interleave differently.
fn stride_schedule(weights: &[i64]) -> Vec<u32> {
    use std::cmp::{Ordering, Reverse};
    use std::collections::BinaryHeap;

    /// The `k`-th pick of backend `i`, at `(2k + 1) / 2w` of the period.
    #[derive(PartialEq, Eq)]
    struct Slot {
        k: i64,
        w: i64,
        i: u32,
    }
    impl Ord for Slot {
        fn cmp(&self, o: &Self) -> Ordering {
            // (2k+1)/2w against (2k'+1)/2w', without division.
            ((2 * self.k + 1) as i128 * o.w as i128)
                .cmp(&((2 * o.k + 1) as i128 * self.w as i128))
                .then(self.i.cmp(&o.i))
        }
    }
    impl PartialOrd for Slot {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }

    let total: i64 = weights.iter().sum();
    let mut heap: BinaryHeap<Reverse<Slot>> = weights
        .iter()
        .enumerate()
        .filter(|(_, &w)| w > 0)
        .map(|(i, &w)| {
            Reverse(Slot {
                k: 0,
                w,
                i: i as u32,
            })
        })
        .collect();
    let mut schedule = Vec::with_capacity(total as usize);
    while let Some(Reverse(s)) = heap.pop() {
        schedule.push(s.i);
        if s.k + 1 < s.w {
            heap.push(Reverse(Slot { k: s.k + 1, ..s }));
        }
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

    /// The straightforward construction (nginx's loop over every backend at every step), which
    /// `smooth_schedule` must reproduce exactly.
    fn reference(weights: &[i64]) -> Vec<u32> {
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::new();
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

    fn with_units(units: &[u32]) -> Vec<std::sync::Arc<TestBackend>> {
        let r = backends(units);
        for (b, &u) in r.iter().zip(units) {
            b.effective.store(u, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    #[test]
    fn same_sequence_as_nginx_on_random_weights() {
        let rng = crate::util::Rng::seeded(20);
        for round in 0..500 {
            // Few distinct weights (the usual case) and many (slow start), small and large; every
            // tenth round a larger pool with few weights, where each class holds many backends.
            let large = round % 10 == 9;
            let n = 1 + rng.below(if large { 300 } else { 12 }) as usize;
            let spread = if large {
                4
            } else {
                [3, 10, 60, 1000][round % 4]
            };
            let units: Vec<u32> = (0..n).map(|_| 1 + rng.below(spread) as u32).collect();
            let r = with_units(&units);
            let weights = period_weights(&r);
            let exact = weight_classes(&weights).len() as i64 * weights.iter().sum::<i64>();
            assert!(exact <= EXACT_WORK, "{units:?} takes the exact path");
            assert_eq!(
                smooth_schedule(&r),
                reference(&weights),
                "weights {units:?}"
            );
        }
    }

    #[test]
    fn equal_weights_are_one_rotation_however_many() {
        let r = backends(&[3; 10_000]);
        let s = WeightedRoundRobin::new(&r).schedule().to_vec();
        assert_eq!(s, (0..10_000).collect::<Vec<u32>>());
    }

    #[test]
    fn diverse_weights_get_exact_shares_from_the_stride_construction() {
        // 361 distinct weights summing to 65 341, just within one period: the exact construction
        // would take 361 × 65 341 steps.
        let units: Vec<u32> = (1..=361).collect();
        let r = with_units(&units);
        let weights = period_weights(&r);
        let distinct = weight_classes(&weights).len() as i64;
        let total: i64 = weights.iter().sum();
        assert!(total * distinct > EXACT_WORK);
        let s = smooth_schedule(&r);
        assert_eq!(s.len() as i64, total);
        let mut counts = vec![0i64; r.len()];
        for &i in &s {
            counts[i as usize] += 1;
        }
        assert_eq!(counts, weights, "every backend gets exactly its share");
        // Evenly spaced: the k-th pick of a backend lands within n places of (k + ½)/w of the period.
        let mut seen = vec![0i64; r.len()];
        for (pos, &i) in s.iter().enumerate() {
            let (k, w) = (seen[i as usize], weights[i as usize]);
            let ideal = (2 * k + 1) as f64 * total as f64 / (2 * w) as f64;
            assert!((pos as f64 - ideal).abs() <= r.len() as f64, "backend {i}");
            seen[i as usize] += 1;
        }
        // For weights nginx's way would handle, the stride order is a smooth one too.
        assert_eq!(stride_schedule(&[5, 1, 1]), vec![0, 0, 0, 1, 2, 0, 0]);
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
