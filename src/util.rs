//! Small pieces every layer uses: a lock-free random source, a log rate limiter, wall-clock
//! milliseconds and a mutex helper. Nothing here knows about services, backends or connections.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Locks `m`, taking over the data of a holder that panicked: every guarded structure here stays
/// consistent between statements, so a poisoned lock carries nothing half-written.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This host's name (a container's hostname under Docker), for telling balancer replicas apart.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A shared, lock-free random source (SplitMix64 over an atomic counter): one `fetch_add` per draw, so
/// threads never wait on each other and a fixed seed gives a fixed sequence in a single-threaded test.
#[derive(Debug)]
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn seeded(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    pub(crate) fn from_entropy() -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // The stack address differs per thread and per run (ASLR): two Rngs made in the same
        // nanosecond on different threads still differ.
        let local = 0u8;
        Rng::seeded(t ^ ((&local as *const u8 as u64).rotate_left(32)))
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (no modulo bias worth measuring at these sizes).
    pub(crate) fn below(&self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Allows one event per period and counts the ones it suppressed (error logs of a loop that must
/// keep going, like an accept loop out of descriptors).
#[derive(Debug)]
pub(crate) struct RateLimited {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimited {
    /// At most one a second.
    fn default() -> Self {
        RateLimited::new(Duration::from_secs(1))
    }
}

impl RateLimited {
    pub(crate) fn new(period: Duration) -> RateLimited {
        RateLimited {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were suppressed since the last one.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
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

    #[test]
    fn rate_limit_suppresses_within_the_period() {
        let mut r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(r.allow(), None);
        }
        r.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(r.allow(), Some(5));
    }
}
