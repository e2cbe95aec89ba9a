//! Consistent hashing on the client IP address, with a Maglev lookup table (Eisenbud et al., NSDI 2016).
//!
//! Every backend fills table slots in its own pseudo-random order, taking turns in proportion to its
//! weight; a client IP hashes to a slot. Adding or removing one of N backends changes about 1/N of the
//! slots, so about 1/N of clients move. The hash is a fixed FNV-1a + mixer, not Rust's per-process
//! `RandomState`, so a client maps to the same backend across restarts and across balancer replicas.
//!
//! Agreement between balancers: the table is a function of the set of members and their *configured*
//! weights only. It is built over every member, sorted by address, whatever order they arrived in, and
//! whether or not they are healthy, ejected, draining or slow-starting now; a member that cannot take
//! the connection is skipped at lookup (the walk goes on to the next slot). So two balancers with the
//! same members send every client to the same backend, and one that sees a backend down moves only
//! that backend's clients.

use std::net::{IpAddr, SocketAddr};

use super::{allowed, Balancer, Candidate};

pub(crate) struct SourceHash {
    table: Vec<u32>,
    /// Per member (as the table indexes them): whether it may take new connections now.
    eligible: Vec<bool>,
}

/// Smallest table: a prime well above 100 × backends keeps each backend's share within about 1 %.
const MIN_TABLE: usize = 65_537;

impl SourceHash {
    /// The table over `members`, which must be sorted by address; `eligible` says which may take new
    /// connections now.
    pub(crate) fn new<C: Candidate>(members: &[C], eligible: Vec<bool>) -> SourceHash {
        debug_assert!(members.windows(2).all(|w| w[0].addr() < w[1].addr()));
        debug_assert_eq!(members.len(), eligible.len());
        let table = if eligible.iter().any(|e| *e) {
            maglev_table(members)
        } else {
            Vec::new()
        };
        SourceHash { table, eligible }
    }
}

impl<C: Candidate> Balancer<C> for SourceHash {
    fn pick(&self, members: &[C], client: SocketAddr, avoid: &[SocketAddr]) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let slot = (hash_ip(client.ip()) % m as u64) as usize;
        // A member that cannot take it, or was tried: walk on through the table, which lands on a
        // deterministic next choice.
        (0..m)
            .map(|k| self.table[(slot + k) % m] as usize)
            .find(|&i| self.eligible[i] && allowed(&members[i], avoid))
    }
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // final avalanche (SplitMix64's), so nearby addresses spread over the table
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => fnv1a(&v4.octets(), 0),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => fnv1a(&v4.octets(), 0),
            None => fnv1a(&v6.octets(), 0),
        },
    }
}

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn table_size(backends: usize) -> usize {
    let mut m = MIN_TABLE.max(backends * 100);
    while !is_prime(m) {
        m += 1;
    }
    m
}

fn backend_key<C: Candidate>(b: &C) -> Vec<u8> {
    b.addr().to_string().into_bytes()
}

/// The lookup table over `members`, in their order, by configured weight.
fn maglev_table<C: Candidate>(members: &[C]) -> Vec<u32> {
    let ready = members;
    let n = ready.len();
    if n == 0 {
        return Vec::new();
    }
    let m = table_size(n);
    let perms: Vec<(usize, usize)> = ready
        .iter()
        .map(|b| {
            let key = backend_key(b);
            let offset = (fnv1a(&key, 0x5157) % m as u64) as usize;
            let skip = (fnv1a(&key, 0x0b5e) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let max_w = ready.iter().map(|b| b.weight() as u64).max().unwrap_or(1);
    let mut next = vec![0usize; n];
    let mut credit = vec![0u64; n];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    while filled < m {
        for i in 0..n {
            credit[i] += ready[i].weight() as u64;
            while credit[i] >= max_w && filled < m {
                credit[i] -= max_w;
                let (offset, skip) = perms[i];
                loop {
                    let slot = (offset + next[i] * skip) % m;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn contract() {
        basic_contract(|r| Box::new(SourceHash::new(r, vec![true; r.len()])));
    }

    #[test]
    fn same_client_same_backend() {
        let r = backends(&[1, 1, 1, 1]);
        let h = SourceHash::new(&r, vec![true; r.len()]);
        for i in 0..100 {
            let first = h.pick(&r, client(i), &[]);
            let other_port = SocketAddr::new(client(i).ip(), 1234);
            assert_eq!(first, h.pick(&r, other_port, &[]));
        }
    }

    #[test]
    fn shares_follow_weights() {
        let r = backends(&[1, 2, 7]);
        let s = shares(&SourceHash::new(&r, vec![true; r.len()]), &r, 20_000);
        for (got, want) in s.iter().zip([2000.0, 4000.0, 14000.0]) {
            assert!((*got as f64 - want).abs() / 20_000.0 < 0.03, "{s:?}");
        }
    }

    /// Removing one of N moves only the clients of the removed backend (plus a little Maglev churn);
    /// adding one moves about 1/(N+1).
    #[test]
    fn removal_and_addition_move_about_one_nth() {
        let n = 10;
        let all = backends(&vec![1; n + 1]);
        let ten: Vec<_> = all[..n].to_vec();
        let nine: Vec<_> = all[..n - 1].to_vec();
        let (h10, h9, h11) = (
            SourceHash::new(&ten, vec![true; n]),
            SourceHash::new(&nine, vec![true; n - 1]),
            SourceHash::new(&all, vec![true; n + 1]),
        );
        let clients = 20_000;
        let (mut moved_rm, mut moved_add) = (0, 0);
        for i in 0..clients {
            let c = client(i);
            let a = ten[h10.pick(&ten, c, &[]).unwrap()].addr;
            if nine[h9.pick(&nine, c, &[]).unwrap()].addr != a {
                moved_rm += 1;
            }
            if all[h11.pick(&all, c, &[]).unwrap()].addr != a {
                moved_add += 1;
            }
        }
        let (rm, add) = (
            moved_rm as f64 / clients as f64,
            moved_add as f64 / clients as f64,
        );
        assert!(rm > 0.07 && rm < 0.15, "removal moved {rm}");
        assert!(add > 0.06 && add < 0.14, "addition moved {add}");
    }

    /// A member that cannot take connections is skipped: only its own clients move, and they come
    /// back when it does. The table itself does not change.
    #[test]
    fn an_ineligible_member_moves_only_its_own_clients() {
        let r = backends(&[1, 1, 1, 1]);
        let all = SourceHash::new(&r, vec![true; 4]);
        let third_down = SourceHash::new(&r, vec![true, true, false, true]);
        for i in 0..5_000 {
            let (a, b) = (
                all.pick(&r, client(i), &[]),
                third_down.pick(&r, client(i), &[]),
            );
            if a == Some(2) {
                assert_ne!(b, Some(2));
            } else {
                assert_eq!(a, b, "client {i} of another backend moved");
            }
        }
        let none = SourceHash::new(&r, vec![false; 4]);
        assert_eq!(none.pick(&r, client(1), &[]), None);
    }

    /// The table reads configured weights only: a backend slow-starting (a lower weight in use)
    /// keeps its share of the table, so a balancer ramping it agrees with one that is not.
    #[test]
    fn slow_start_does_not_change_the_table() {
        let r = backends(&[2, 2, 2]);
        let before = SourceHash::new(&r, vec![true; 3]);
        r[1].effective
            .store(1, std::sync::atomic::Ordering::Relaxed);
        let ramping = SourceHash::new(&r, vec![true; 3]);
        for i in 0..2_000 {
            assert_eq!(
                before.pick(&r, client(i), &[]),
                ramping.pick(&r, client(i), &[])
            );
        }
    }
}
