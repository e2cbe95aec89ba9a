//! The exec slots: how many `kind: exec` commands run at once, shared fairly between services.
//!
//! At most [`CAP`] commands run in the process, and each service with exec checks may hold at most
//! its share of them ([`share`]): the cap divided by the number of such services, at least one. So
//! one service whose commands hang (each holding its slot until its timeout) can never take the
//! slots another service's checks need. With more services than [`CAP`], each still has one slot:
//! at most one command per service then runs.
//!
//! The table ([`Table`]) is pure; [`Member`] takes its slots from the process's table, waiting
//! for one to be given back when there is none.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Commands running at once, across every service (more only with more services: one each).
pub(crate) const CAP: usize = 16;

/// The slots one service may hold when `services` services have exec checks.
pub(super) fn share(cap: usize, services: usize) -> usize {
    (cap / services.max(1)).max(1)
}

#[derive(Debug, Default)]
struct Entry {
    /// Probe specs of this service (a reload's new spec and the old one for a moment).
    members: usize,
    held: usize,
}

/// Who holds how many slots. One entry per service with exec checks (bounded by the config); an
/// entry goes when its service has no spec and holds nothing.
#[derive(Debug)]
pub(super) struct Table {
    cap: usize,
    services: BTreeMap<Arc<str>, Entry>,
}

/// Why a slot was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Busy {
    /// The slots the service holds, and its share.
    pub(super) held: usize,
    pub(super) share: usize,
    /// The slots held in all.
    pub(super) running: usize,
}

impl Table {
    pub(super) const fn new(cap: usize) -> Table {
        Table {
            cap,
            services: BTreeMap::new(),
        }
    }

    fn members(&self) -> usize {
        self.services.values().filter(|e| e.members > 0).count()
    }

    fn running(&self) -> usize {
        self.services.values().map(|e| e.held).sum()
    }

    pub(super) fn join(&mut self, service: &Arc<str>) {
        self.services.entry(service.clone()).or_default().members += 1;
    }

    /// Returns whether the shares grew (a waiting probe may now have room).
    pub(super) fn leave(&mut self, service: &str) -> bool {
        let Some(e) = self.services.get_mut(service) else {
            return false;
        };
        e.members = e.members.saturating_sub(1);
        let gone = e.members == 0;
        if gone && e.held == 0 {
            self.services.remove(service);
        }
        gone
    }

    /// Takes a slot for `service` (a member), or says why not: its share is held, or the cap is.
    pub(super) fn take(&mut self, service: &str) -> Result<(), Busy> {
        let members = self.members();
        let share = share(self.cap, members);
        let running = self.running();
        let Some(e) = self.services.get_mut(service) else {
            return Err(Busy {
                held: 0,
                share: 0,
                running,
            });
        };
        if e.held >= share || running >= self.cap.max(members) {
            return Err(Busy {
                held: e.held,
                share,
                running,
            });
        }
        e.held += 1;
        Ok(())
    }

    pub(super) fn give_back(&mut self, service: &str) {
        if let Some(e) = self.services.get_mut(service) {
            e.held = e.held.saturating_sub(1);
            if e.members == 0 && e.held == 0 {
                self.services.remove(service);
            }
        }
    }
}

/// The process's slots.
static TABLE: Mutex<Table> = Mutex::new(Table::new(CAP));

/// Woken when a slot is given back or a service leaves (the shares grow).
static FREED: Notify = Notify::const_new();

fn table() -> MutexGuard<'static, Table> {
    // The table is consistent after every method: a poisoned lock is taken over.
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A service's place among those sharing the slots, for as long as its probe spec lives.
#[derive(Debug)]
pub(crate) struct Member {
    service: Arc<str>,
}

impl Member {
    pub(crate) fn join(service: Arc<str>) -> Member {
        table().join(&service);
        Member { service }
    }

    /// A slot, waited for until `deadline`; `Err` says what held them at the deadline. The first
    /// wait of a probe is logged: a probe that waits is one whose verdict comes late.
    pub(super) async fn slot(&self, deadline: Instant) -> Result<Slot<'_>, Busy> {
        let mut logged = false;
        loop {
            let freed = FREED.notified();
            tokio::pin!(freed);
            // Registered before the table is read: a slot freed in between wakes this wait.
            freed.as_mut().enable();
            let busy = match table().take(&self.service) {
                Ok(()) => return Ok(Slot { member: self }),
                Err(busy) => busy,
            };
            if !logged {
                tracing::info!(
                    service = %self.service,
                    held = busy.held,
                    share = busy.share,
                    running = busy.running,
                    "health: an exec check waits for a slot"
                );
                logged = true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(busy);
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if table().leave(&self.service) {
            FREED.notify_waiters();
        }
    }
}

/// One running command's slot, given back when dropped.
pub(super) struct Slot<'a> {
    member: &'a Member,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        table().give_back(&self.member.service);
        FREED.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_divide_the_cap_and_never_fall_below_one() {
        assert_eq!(share(16, 0), 16);
        assert_eq!(share(16, 1), 16);
        assert_eq!(share(16, 2), 8);
        assert_eq!(share(16, 3), 5);
        assert_eq!(share(16, 16), 1);
        assert_eq!(share(16, 40), 1);
    }

    #[test]
    fn a_service_holding_its_share_leaves_the_rest_to_the_others() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut t = Table::new(4);
        t.join(&a);
        assert!((0..4).all(|_| t.take("a").is_ok()), "alone: the whole cap");
        assert_eq!(
            t.take("a"),
            Err(Busy {
                held: 4,
                share: 4,
                running: 4
            })
        );
        t.join(&b);
        // a holds more than its new share until its commands end; b waits only for the cap.
        assert!(t.take("b").is_err());
        t.give_back("a");
        assert!(t.take("b").is_ok());
        t.give_back("a");
        assert!(t.take("a").is_err(), "a is at its share of 2");
        assert!(t.take("b").is_ok());
        assert_eq!(
            t.take("b"),
            Err(Busy {
                held: 2,
                share: 2,
                running: 4
            })
        );
        t.give_back("a");
        assert!(t.take("a").is_ok());
        assert!(t.take("a").is_err(), "at its share again");
    }

    #[test]
    fn more_services_than_the_cap_get_one_slot_each() {
        let names: Vec<Arc<str>> = (0..6).map(|i| i.to_string().into()).collect();
        let mut t = Table::new(4);
        names.iter().for_each(|n| t.join(n));
        for n in &names {
            assert!(t.take(n).is_ok(), "{n}");
            assert!(t.take(n).is_err(), "{n}: one each");
        }
    }

    #[test]
    fn a_service_that_leaves_gives_its_share_to_the_rest_and_its_entry_goes() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut t = Table::new(4);
        t.join(&a);
        t.join(&b);
        t.join(&b); // a reload's new spec beside the old
        assert!(t.take("b").is_ok());
        assert!(!t.leave("b"), "one spec of b is left");
        assert!(t.leave("b"));
        assert_eq!(t.services.len(), 2, "b holds a slot still");
        t.give_back("b");
        assert_eq!(t.services.len(), 1);
        assert!((0..4).all(|_| t.take("a").is_ok()), "a has the whole cap");
        assert!(t.take("gone").is_err(), "a service that is no member");
        assert!(!t.leave("gone"));
    }
}
