//! The clock a relay stamps its activity with, for the idle and half-close timers: the kernel's
//! coarse monotonic clock, read at every write. Those timers need the last write to within a few
//! milliseconds, and a keep-alive request writes twice: with the precise clock, through libc and
//! std, the reads were 2–3 % of the epoll engine's samples in keep-alive profiles, where the
//! coarse one is a field read in the vDSO. A stamp becomes an instant again only when a timer fires.

use std::time::Duration;

use tokio::time::Instant;

/// Now, in milliseconds on the coarse clock; never 0, which stands for "nothing written yet".
pub(super) fn stamp() -> u64 {
    now_ms().max(1)
}

/// The instant of the write that took `stamp`, or a little later, never earlier: a timer that
/// counts from it fires late by a few milliseconds at most, never early.
pub(super) fn instant_of(stamp: u64) -> Instant {
    let now = Instant::now();
    let age = Duration::from_millis(age_at_most(now_ms(), stamp, resolution_ms()));
    now.checked_sub(age).unwrap_or(now)
}

/// How long ago a write stamped `stamp` was, at most, when the coarse clock reads `now` (both in
/// whole milliseconds). The coarse clock lags the precise one by up to its resolution `res_ms`
/// (it moves on at the kernel's tick), twice that allowed for a late tick, and flooring each
/// reading to the millisecond takes up to one more: so the difference of two readings can
/// exceed the time between them by `2 × res_ms + 1`, which is taken off.
fn age_at_most(now: u64, stamp: u64, res_ms: u64) -> u64 {
    now.saturating_sub(stamp).saturating_sub(2 * res_ms + 1)
}

#[cfg(target_os = "linux")]
fn now_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    t.tv_sec as u64 * 1_000 + t.tv_nsec as u64 / 1_000_000
}

/// The coarse clock's resolution (the kernel's tick), rounded up to whole milliseconds.
#[cfg(target_os = "linux")]
fn resolution_ms() -> u64 {
    let r = rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse);
    (r.tv_sec as u64 * 1_000_000_000 + r.tv_nsec as u64).div_ceil(1_000_000)
}

/// Elsewhere, the precise clock, from the first reading in this process.
#[cfg(not(target_os = "linux"))]
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

#[cfg(not(target_os = "linux"))]
fn resolution_ms() -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_is_never_overstated() {
        // Res 4 ms: two readings 10 ms apart by the coarse clock may be 1 ms apart in truth
        // (the first read just after its tick, the second just before its tick ran late).
        assert_eq!(age_at_most(1_010, 1_000, 4), 1);
        assert_eq!(age_at_most(1_009, 1_000, 4), 0);
        assert_eq!(age_at_most(1_000, 1_000, 4), 0);
        // A stamp read after `now` (another thread's reading): no age, not an underflow.
        assert_eq!(age_at_most(1_000, 1_005, 4), 0);
        assert_eq!(age_at_most(61_000, 1_000, 0), 59_999);
    }

    #[test]
    fn a_stamp_turns_back_into_an_instant_no_earlier_than_it_was_taken() {
        let before = Instant::now();
        let s = stamp();
        assert!(s > 0);
        let at = instant_of(s);
        assert!(at >= before, "{:?} before the stamp", before - at);
        assert!(at <= Instant::now());
    }
}
