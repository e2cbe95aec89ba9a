//! The sessions of one listen address: found by the client address and the address it sent to,
//! bounded by `udp.max_sessions`, and when full the one idle longest makes room (pure: the loop
//! that owns the table acts on what it returns).
//!
//! Idle order is kept lazily: a session's place in the order is its activity when it was last
//! placed, and only a candidate for eviction is checked against its real last activity (moved back
//! in the order if it has been active since). A datagram costs no update of the order; an eviction
//! costs O(log n) per session it finds active since it was placed.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

/// A session's key: the client, and the address it sent to.
pub(crate) type Key = (SocketAddr, SocketAddr);

/// Every session of a listen address.
#[derive(Debug)]
pub(crate) struct Table<V> {
    max: usize,
    next: u64,
    /// The session that takes a client's next datagram (one that took its `requests` is no
    /// longer here, though it still waits for its answers).
    current: HashMap<Key, u64>,
    entries: HashMap<u64, Entry<V>>,
    /// (activity when placed, id), oldest first.
    order: BTreeSet<(u64, u64)>,
}

#[derive(Debug)]
struct Entry<V> {
    key: Key,
    placed: u64,
    value: V,
}

impl<V> Table<V> {
    pub(crate) fn new(max: usize) -> Table<V> {
        Table {
            max: max.max(1),
            next: 1,
            current: HashMap::new(),
            entries: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    /// A reload's new `udp.max_sessions`: a smaller bound is reached by evicting as sessions come.
    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The session that takes `key`'s next datagram.
    pub(crate) fn get(&self, key: &Key) -> Option<(u64, &V)> {
        let id = *self.current.get(key)?;
        self.entries.get(&id).map(|e| (id, &e.value))
    }

    /// A session by its id, whether or not it takes its client's next datagram.
    pub(crate) fn by_id(&self, id: u64) -> Option<&V> {
        self.entries.get(&id).map(|e| &e.value)
    }

    /// Adds a session for `key`, active at `now`; when the table is full it first takes out the
    /// session idle longest (`last_active` tells a session's real last activity) and returns it.
    pub(crate) fn insert(
        &mut self,
        key: Key,
        value: V,
        now: u64,
        last_active: impl Fn(&V) -> u64,
    ) -> (u64, Option<V>) {
        let mut evicted = None;
        // One out per session in: a bound lowered by a reload is reached as clients come.
        if self.entries.len() >= self.max {
            evicted = self.evict(last_active);
        }
        let id = self.next;
        self.next += 1;
        // A previous session of the client's, if any, stays (detached) until it ends.
        self.current.insert(key, id);
        self.entries.insert(
            id,
            Entry {
                key,
                placed: now,
                value,
            },
        );
        self.order.insert((now, id));
        (id, evicted)
    }

    /// The session no longer takes its client's datagrams (it took its `requests`); it stays in
    /// the table, and counts against its bound, until it ends.
    pub(crate) fn detach(&mut self, id: u64) {
        if let Some(e) = self.entries.get(&id) {
            if self.current.get(&e.key) == Some(&id) {
                self.current.remove(&e.key);
            }
        }
    }

    /// Takes a session out (it ended).
    pub(crate) fn remove(&mut self, id: u64) -> Option<V> {
        let e = self.entries.remove(&id)?;
        self.order.remove(&(e.placed, id));
        if self.current.get(&e.key) == Some(&id) {
            self.current.remove(&e.key);
        }
        Some(e.value)
    }

    /// Takes out the session idle longest.
    pub(crate) fn evict(&mut self, last_active: impl Fn(&V) -> u64) -> Option<V> {
        loop {
            let (placed, id) = self.order.pop_first()?;
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            let real = last_active(&e.value);
            if real > placed {
                // Active since it was placed: back in the order at its real activity.
                e.placed = real;
                self.order.insert((real, id));
                continue;
            }
            let e = self.entries.remove(&id)?;
            if self.current.get(&e.key) == Some(&id) {
                self.current.remove(&e.key);
            }
            return Some(e.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn key(port: u16) -> Key {
        (
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 2], 53)),
        )
    }

    /// Values are their own last activity.
    fn activity(v: &Cell<u64>) -> u64 {
        v.get()
    }

    #[test]
    fn a_client_finds_its_session_and_another_does_not() {
        let mut t = Table::new(4);
        let (id, none) = t.insert(key(1), Cell::new(0), 0, activity);
        assert!(none.is_none());
        assert_eq!(t.get(&key(1)).map(|(i, _)| i), Some(id));
        assert!(t.get(&key(2)).is_none());
    }

    #[test]
    fn when_full_the_one_idle_longest_makes_room_not_the_oldest() {
        let mut t = Table::new(3);
        let (a, _) = t.insert(key(1), Cell::new(10), 10, activity);
        let (_b, _) = t.insert(key(2), Cell::new(20), 20, activity);
        let (_c, _) = t.insert(key(3), Cell::new(30), 30, activity);
        // The oldest session was active after the others.
        if let Some(e) = t.entries.get(&a) {
            e.value.set(40);
        }
        let (_d, evicted) = t.insert(key(4), Cell::new(50), 50, activity);
        assert_eq!(evicted.map(|v| v.get()), Some(20));
        assert_eq!(t.len(), 3);
        assert!(t.get(&key(2)).is_none());
        assert!(t.get(&key(1)).is_some());
    }

    #[test]
    fn the_table_never_grows_past_its_bound_under_a_flood() {
        let mut t = Table::new(100);
        let mut evictions = 0;
        for port in 1..=10_000u16 {
            let now = u64::from(port);
            let (_, e) = t.insert(key(port), Cell::new(now), now, activity);
            evictions += usize::from(e.is_some());
            assert!(t.len() <= 100);
        }
        assert_eq!(evictions, 10_000 - 100);
        assert_eq!(t.order.len(), t.len());
    }

    #[test]
    fn a_detached_session_stays_until_it_ends_and_the_client_gets_a_new_one() {
        let mut t = Table::new(4);
        let (first, _) = t.insert(key(1), Cell::new(0), 0, activity);
        t.detach(first);
        assert!(t.get(&key(1)).is_none());
        assert_eq!(t.len(), 1);
        let (second, _) = t.insert(key(1), Cell::new(1), 1, activity);
        assert_eq!(t.get(&key(1)).map(|(i, _)| i), Some(second));
        // The first ending does not take the client's new session with it.
        assert!(t.remove(first).is_some());
        assert_eq!(t.get(&key(1)).map(|(i, _)| i), Some(second));
        assert_eq!(t.len(), 1);
        assert_eq!(t.order.len(), 1);
    }

    #[test]
    fn a_replaced_session_evicted_leaves_the_current_one_in_place() {
        let mut t = Table::new(2);
        let (first, _) = t.insert(key(1), Cell::new(0), 0, activity);
        t.detach(first);
        let (second, _) = t.insert(key(1), Cell::new(5), 5, activity);
        let (_, evicted) = t.insert(key(2), Cell::new(6), 6, activity);
        assert_eq!(evicted.map(|v| v.get()), Some(0));
        assert_eq!(t.get(&key(1)).map(|(i, _)| i), Some(second));
    }
}
