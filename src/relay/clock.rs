//! The clock a relay stamps its activity with, for the idle and half-close timers: the kernel's
//! coarse monotonic clock, read at every write. Those timers need the last write to within a few
//! milliseconds, and a keep-alive request writes twice: with the precise clock, through libc and
//! std, the reads were about 2 % of the epoll engine's samples in keep-alive profiles, where the
//! coarse one is a field read in the vDSO. A stamp becomes an instant again only when a timer fires.
//!
//! The stamps are the kernel's time, not tokio's: under tokio's paused test clock a relay's idle
//! timer would re-arm for ever after a write, so no test of it may pause the clock.

use std::time::Duration;

use tokio::time::Instant;

/// Now, in milliseconds on the coarse clock; never 0, which stands for "nothing written yet".
pub(crate) fn stamp() -> u64 {
    now_ms().max(1)
}

/// How long ago `stamp` was taken, to the coarse clock's resolution (an operator's `idle_s`).
pub(crate) fn since(stamp: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(stamp))
}

/// The instant of the write that took `stamp`, or a little later: a timer that counts from it
/// fires late by up to about three of the kernel's ticks and 2 ms, and early only if a tick ran
/// more than a tick late as the stamp was taken.
pub(super) fn instant_of(stamp: u64) -> Instant {
    let age = Duration::from_millis(age_at_most(now_ms(), stamp, resolution_ms()));
    // Read after the coarse clock, so a pause between the two makes the age short, not long.
    let now = Instant::now();
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

/// The coarse clock's resolution (the kernel's tick), rounded up to whole milliseconds; asked once.
#[cfg(target_os = "linux")]
fn resolution_ms() -> u64 {
    static RES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RES.get_or_init(|| {
        let r = rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse);
        (r.tv_sec as u64 * 1_000_000_000 + r.tv_nsec as u64).div_ceil(1_000_000)
    })
}

/// Elsewhere, the precise clock, from the first reading in this process.
#[cfg(not(target_os = "linux"))]
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
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
        // Res 4 ms: two readings 10 ms apart by the coarse clock may be 1 ms apart in truth (the
        // stamp read just before a tick that ran late, `now` just after a tick).
        assert_eq!(age_at_most(1_010, 1_000, 4), 1);
        assert_eq!(age_at_most(1_009, 1_000, 4), 0);
        assert_eq!(age_at_most(1_000, 1_000, 4), 0);
        // A stamp no older than `now`: no age, not an underflow.
        assert_eq!(age_at_most(1_000, 1_005, 4), 0);
        assert_eq!(age_at_most(61_000, 1_000, 0), 59_999);
    }

    /// 50 ms after a stamp, it turns back into an instant no earlier than the stamp was taken: a
    /// timer counted from it never fires early. How late it may be is `age_at_most`'s bound,
    /// checked above on fixed readings; on the real clock a thread descheduled between the two
    /// readings makes it later by the pause, so no upper bound is asserted here (a shared, noisy
    /// machine failed one).
    #[test]
    fn a_stamp_turns_back_into_an_instant_no_earlier_than_it_was_taken() {
        let before = Instant::now();
        let s = stamp();
        assert!(s > 0);
        std::thread::sleep(Duration::from_millis(50));
        let at = instant_of(s);
        assert!(at >= before, "{:?} before the stamp", before - at);
    }
}
