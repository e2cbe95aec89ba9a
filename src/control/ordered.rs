//! [`Ordered`]: a `Mutex` with a rank in [`Control`](super::Control)'s lock order (the order is
//! written on `Control`). Debug builds check, per thread, that a lock is only taken while every one
//! held ranks lower, so a reload or a handler that nests them the wrong way fails its test at the
//! first run instead of deadlocking one day in production. Release builds keep no record: the
//! wrapper is the `Mutex` and [`crate::util::lock`], nothing more.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

use crate::util::lock;

/// A `Mutex` ranked `RANK` in the lock order: it may be taken while only lower ranks are held.
/// The rank is a type parameter, so it costs no byte in either build.
pub(super) struct Ordered<T, const RANK: u8> {
    inner: Mutex<T>,
}

/// The guard of an [`Ordered`] lock: its data, and in debug builds its place in the thread's record
/// until dropped.
pub(super) struct OrderedGuard<'a, T, const RANK: u8> {
    guard: MutexGuard<'a, T>,
}

impl<T, const RANK: u8> Ordered<T, RANK> {
    pub(super) const fn new(value: T) -> Self {
        Ordered {
            inner: Mutex::new(value),
        }
    }

    /// Locks it as [`crate::util::lock`] does (a poisoned lock's data is taken over); in debug builds
    /// first asserts that no lock of this or a higher rank is held on this thread.
    pub(super) fn lock(&self) -> OrderedGuard<'_, T, RANK> {
        // Checked before waiting: taken out of order, it panics here instead of deadlocking.
        #[cfg(debug_assertions)]
        held::check(RANK, std::any::type_name::<T>());
        let guard = lock(&self.inner);
        #[cfg(debug_assertions)]
        held::add(RANK);
        OrderedGuard { guard }
    }
}

impl<T, const RANK: u8> Deref for OrderedGuard<'_, T, RANK> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T, const RANK: u8> DerefMut for OrderedGuard<'_, T, RANK> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(debug_assertions)]
impl<T, const RANK: u8> Drop for OrderedGuard<'_, T, RANK> {
    fn drop(&mut self) {
        held::remove(RANK);
    }
}

/// The ranks this thread holds, one bit each. A guard is `!Send` (it holds a `MutexGuard`), so it is
/// dropped on the thread that took it and the record stays exact.
#[cfg(debug_assertions)]
mod held {
    use std::cell::Cell;

    thread_local! {
        static HELD: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn check(rank: u8, what: &str) {
        debug_assert!(rank < 64, "lock rank {rank} does not fit the record");
        let held = HELD.get();
        // Every bit at `rank` or above: a lock of this or a higher rank is held.
        let above = held & (u64::MAX << rank);
        debug_assert!(
            above == 0,
            "lock order broken: rank {rank} ({what}) taken while holding ranks {:?}; \
             see the lock order on `Control`",
            (0..64)
                .filter(|r| held & (1 << r) != 0)
                .collect::<Vec<u8>>()
        );
    }

    pub(super) fn add(rank: u8) {
        HELD.set(HELD.get() | (1 << rank));
    }

    pub(super) fn remove(rank: u8) {
        HELD.set(HELD.get() & !(1 << rank));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_taken_in_rank_order_pass_and_can_be_taken_again() {
        let (low, high) = (Ordered::<u8, 1>::new(1), Ordered::<u8, 2>::new(2));
        {
            let a = low.lock();
            let b = high.lock();
            assert_eq!((*a, *b), (1, 2));
        }
        // Released, the higher rank is alone again and may come first.
        let b = high.lock();
        drop(b);
        let _a = low.lock();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "lock order broken: rank 1")]
    fn a_lower_rank_taken_under_a_higher_one_panics() {
        let (low, high) = (Ordered::<u8, 1>::new(1), Ordered::<u8, 2>::new(2));
        let _b = high.lock();
        let _a = low.lock();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "lock order broken: rank 3")]
    fn the_same_rank_twice_panics_instead_of_deadlocking() {
        let (one, other) = (Ordered::<u8, 3>::new(1), Ordered::<u8, 3>::new(2));
        let _a = one.lock();
        let _b = other.lock();
    }

    #[test]
    fn a_poisoned_lock_is_taken_over_as_util_lock_does() {
        let m = std::sync::Arc::new(Ordered::<u8, 0>::new(7));
        let holder = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = holder.lock();
            panic!("poisons the lock");
        })
        .join();
        assert!(m.inner.is_poisoned());
        assert_eq!(*m.lock(), 7);
    }
}
