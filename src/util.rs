//! Small pieces every layer uses: a lock-free random source, a log rate limiter, wall-clock
//! milliseconds and a mutex helper. Nothing here knows about services, backends or connections.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

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

/// Declares an enum of named states stored as one byte: `#[repr(u8)]`, its name for the logs, events
/// and the admin API (`as_str`, and its serde name), and [`ByteEnum`] for [`AtomicEnum`]. Each
/// variant is written once, with its byte and its name. Byte 0 is the first variant, and a byte no
/// variant has (which [`AtomicEnum`] never stores) reads as it.
macro_rules! byte_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $byte:literal => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant = $byte,)+
        }

        impl $name {
            /// Its name in the logs, the events and the admin API.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl $crate::util::ByteEnum for $name {
            fn to_byte(self) -> u8 {
                self as u8
            }
            fn from_byte(b: u8) -> $name {
                match b {
                    $($byte => $name::$variant,)+
                    _ => [$($name::$variant),+][0],
                }
            }
        }
    };
}
pub(crate) use byte_enum;

/// An enum stored as one byte: what [`AtomicEnum`] holds.
pub(crate) trait ByteEnum: Copy {
    fn to_byte(self) -> u8;
    /// The value for `b`; a byte no value maps to cannot be stored, so any fallback is unreachable.
    fn from_byte(b: u8) -> Self;
}

/// An enum in an `AtomicU8`, read and written only as the enum (a backend's health and state).
#[derive(Debug)]
pub(crate) struct AtomicEnum<T>(std::sync::atomic::AtomicU8, std::marker::PhantomData<T>);

impl<T: ByteEnum> AtomicEnum<T> {
    pub(crate) fn new(v: T) -> AtomicEnum<T> {
        AtomicEnum(
            std::sync::atomic::AtomicU8::new(v.to_byte()),
            std::marker::PhantomData,
        )
    }

    pub(crate) fn load(&self) -> T {
        T::from_byte(self.0.load(Relaxed))
    }

    /// Stores `v`; returns what was there.
    pub(crate) fn swap(&self, v: T) -> T {
        T::from_byte(self.0.swap(v.to_byte(), Relaxed))
    }
}

/// Whether `e` says this process or host ran out of something (descriptors, buffers, memory, local
/// ports): the peer is not to blame, so neither a connect nor a probe that fails this way counts
/// against a backend.
pub(crate) fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Whether an accept that failed with `errno` failed for the one client it was taking (the client
/// died in the backlog), so the next accept may succeed at once. Any other failure is the
/// listener's or the process's (out of descriptors or memory, a broken socket) and calls for
/// backing off, or the accept loop would spin on it. EPERM is one of those: accept(2) lists it as
/// "firewall rules forbid connection", but on Linux it comes from a policy, not a client: a
/// security module's `socket_accept` check, which runs before any client is taken off the queue,
/// or a seccomp filter that fails the call itself. Either fails the same way again at once, for as
/// long as the policy holds.
pub(crate) fn accept_failed_one_client(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EPROTO
    )
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as RFC 3339 in UTC, to the second (`2026-11-30T05:38:00Z`).
pub(crate) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm, the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
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

/// The rows of the Markdown table under `header` in `docs/FILE`, each as its trimmed cells: for
/// tests that check a documented table against the code.
#[cfg(test)]
pub(crate) fn doc_table(file: &str, header: &str) -> Vec<Vec<String>> {
    let path = format!("{}/docs/{file}", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).unwrap();
    let (_, table) = doc.split_once(header).expect(header);
    let rows = table.lines().skip(2).take_while(|l| l.starts_with('|'));
    let cells = |l: &str| l.split('|').skip(1).map(|c| c.trim().to_string()).collect();
    rows.map(|l| {
        let mut c: Vec<String> = cells(l);
        c.pop(); // after the closing bar
        c
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_999), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_017_080_000), "2026-11-30T05:38:00Z");
    }

    /// Accept errors of one client are retried at once; a refusal (EPERM, from a security module
    /// or a seccomp filter) and running out are backed off from, as they would come back at once
    /// (both accept loops, `listener.rs` and the ring's, ask this).
    #[test]
    fn only_a_client_dead_in_the_backlog_is_retried_at_once() {
        for e in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EINTR,
            libc::EPROTO,
        ] {
            assert!(accept_failed_one_client(e), "errno {e}");
        }
        for e in [
            libc::EPERM,
            libc::EACCES,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
        ] {
            assert!(!accept_failed_one_client(e), "errno {e}");
        }
    }

    /// `e` and its sources as an error reporter prints them (`a: b: c`).
    fn report(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text += ": ";
            text += &c.to_string();
            cause = c.source();
        }
        text
    }

    /// The errors that name their cause in their message print it once, whether shown alone (logs,
    /// the admin API) or with their sources (a reporter).
    #[test]
    fn errors_print_each_cause_once() {
        use crate::config::ConfigError;
        use crate::control::ReloadError;
        use crate::listener::BindError;
        use crate::replicas::{ScaleError, ScaleRefusal};
        use crate::selfcheck::NotReady;
        let io = || std::io::Error::other("CAUSE");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let read = || ConfigError::Read {
            path: "/x".into(),
            error: io(),
        };
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(BindError {
                service: "web".into(),
                addr,
                error: io(),
            }),
            Box::new(read()),
            Box::new(ReloadError::from(read())),
            Box::new(NotReady::Unreachable { addr, error: io() }),
            Box::new(ScaleError::from(ScaleRefusal::Busy("CAUSE".into()))),
        ];
        for e in errors {
            let all = report(e.as_ref());
            assert_eq!(all.matches("CAUSE").count(), 1, "{all}");
        }
    }

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

    /// Under tokio's paused clock: the hour passes at once.
    #[tokio::test(start_paused = true)]
    async fn rate_limit_suppresses_within_the_period() {
        let mut r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(r.allow(), None);
        }
        tokio::time::advance(Duration::from_secs(3599)).await;
        assert_eq!(r.allow(), None, "still within the period");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.allow(), Some(6), "the suppressed ones are counted");
    }
}
