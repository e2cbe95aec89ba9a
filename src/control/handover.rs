//! What an upgrade needs of the running server (the `upgrade` module runs the hand-over itself):
//! the listening sockets to pass on, accepting stopped once the new process accepts, the
//! connections carried in resumed on the workers, and the totals the dashboard and `/metrics` show,
//! taken in the old process and added in the new.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use super::Control;
use crate::admission::Denied;
use crate::session::{self, Carried};

/// The totals of every service and backend, by name: what an upgrade carries so that counters go
/// on from where the old process left them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Totals {
    pub(crate) services: BTreeMap<String, BTreeMap<String, u64>>,
    /// Service name → backend address → totals.
    pub(crate) backends: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
    /// The runtime deny list's API and ban entries: state, not counters, so each part that has
    /// some puts them on the new process's list as they are. Absent from an older process's parts
    /// (and skipped by an older new process, whose JSON ignores what it does not know).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) deny: Vec<Denied>,
}

/// Backends per [`Totals`] part: each part fits one hand-over message.
const BACKENDS_PER_PART: usize = 200;
/// Deny list entries per part: an entry is at most ~700 bytes of JSON (a reason is at most 256
/// bytes, each escaped in at most two).
const DENIED_PER_PART: usize = 50;

impl Totals {
    /// The same totals in parts that each fit one hand-over message: a service's own counters, then
    /// its backends a few hundred at a time. Adding every part adds the whole.
    pub(crate) fn parts(&self) -> Vec<Totals> {
        let mut parts = Vec::new();
        for (name, t) in &self.services {
            parts.push(Totals {
                services: [(name.clone(), t.clone())].into(),
                ..Totals::default()
            });
        }
        for (name, bs) in &self.backends {
            let all: Vec<_> = bs.iter().collect();
            for chunk in all.chunks(BACKENDS_PER_PART) {
                let part = chunk
                    .iter()
                    .map(|(a, t)| ((*a).clone(), (*t).clone()))
                    .collect();
                parts.push(Totals {
                    backends: [(name.clone(), part)].into(),
                    ..Totals::default()
                });
            }
        }
        for chunk in self.deny.chunks(DENIED_PER_PART) {
            parts.push(Totals {
                deny: chunk.to_vec(),
                ..Totals::default()
            });
        }
        parts
    }

    /// What grew since `earlier` (each counter only grows).
    pub(crate) fn since(&self, earlier: &Totals) -> Totals {
        fn minus(
            now: &BTreeMap<String, u64>,
            then: Option<&BTreeMap<String, u64>>,
        ) -> BTreeMap<String, u64> {
            now.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(then.and_then(|t| t.get(k)).copied().unwrap_or(0)),
                    )
                })
                .collect()
        }
        Totals {
            services: self
                .services
                .iter()
                .map(|(s, t)| (s.clone(), minus(t, earlier.services.get(s))))
                .collect(),
            backends: self
                .backends
                .iter()
                .map(|(s, bs)| {
                    let then = earlier.backends.get(s);
                    let bs = bs
                        .iter()
                        .map(|(b, t)| (b.clone(), minus(t, then.and_then(|m| m.get(b)))))
                        .collect();
                    (s.clone(), bs)
                })
                .collect(),
            // As it is now: entries put on since are carried, expired ones are not.
            deny: self.deny.clone(),
        }
    }
}

impl Control {
    /// A descriptor of every listening socket, TCP and UDP, named as the new process finds it
    /// again (`sockets::take`): by address, or a port-0 one by `SERVICE#INDEX` (a UDP one by
    /// `SERVICE#INDEX/udp`).
    pub(crate) fn handover_sockets(
        &self,
    ) -> std::io::Result<Vec<(Option<String>, std::os::fd::OwnedFd)>> {
        let mut sockets: Vec<(Option<String>, std::os::fd::OwnedFd)> = self
            .listeners
            .lock()
            .iter()
            .filter_map(|b| Some((b.key.handover_name(), b.kept.as_ref()?)))
            .map(|(name, l)| Ok((name, l.try_clone()?.into())))
            .collect::<std::io::Result<_>>()?;
        sockets.extend(self.udp.handover_sockets()?);
        Ok(sockets)
    }

    /// Stops every accept loop, keeping this process's descriptors of the listening sockets: the
    /// new process accepts on the same sockets, and until it says it serves, this one may have to
    /// accept again ([`Control::accept_again`]).
    pub(crate) async fn pause_accepting(&self) {
        self.readiness.set(false, true);
        for b in self.listeners.lock().iter_mut() {
            b.stop.cancel();
            b.pending.take();
        }
        self.accepting.close();
        self.accepting.wait().await;
        // The UDP loops stop reading (the new process reads the same sockets); their open
        // sessions go on answering from them until they end.
        self.udp.pause();
    }

    /// The new process died (or stopped answering) before it said it serves: this one accepts
    /// again on the sockets it kept, and is ready again. Their queues never closed: a client that
    /// connected meanwhile waits there and is served now.
    pub(crate) fn accept_again(&self) {
        self.accepting.reopen();
        let mut listeners = self.listeners.lock();
        for b in listeners.iter_mut() {
            let Some(kept) = b.kept.as_ref() else {
                continue;
            };
            match kept.try_clone() {
                Ok(dup) => {
                    b.stop = tokio_util::sync::CancellationToken::new();
                    b.pending = Some(dup);
                    self.spawn_accept(b);
                }
                Err(e) => tracing::error!(listen = %b.local, error = %e,
                    "cannot accept again on a listening socket after a failed upgrade; its clients wait in its queue until a restart"),
            }
        }
        drop(listeners);
        self.udp.resume();
        self.start_udp();
        self.readiness.set(true, false);
    }

    /// The new process serves: this process's descriptors of the listening sockets are closed
    /// (the new process holds its own: the sockets, and what waits in their queues, stay).
    pub(crate) fn close_listeners(&self) {
        let closed = std::mem::take(&mut *self.listeners.lock());
        drop(closed);
        self.udp.close_kept();
    }

    /// Resumes a connection carried in from the process this one replaced, on a worker, tracked
    /// like any other (a drain waits for it): a ring worker when its service runs on the ring
    /// here, else a tokio worker. A service this config does not have is relayed by none: its
    /// connection is reset, and says so.
    pub(crate) fn resume(&self, carried: Carried) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let service = self
            .running
            .lock()
            .iter()
            .map(|r| r.current.load_full())
            .find(|s| *s.name == *carried.facts.service);
        let Some(service) = service else {
            tracing::warn!(service = %carried.facts.service, client = %carried.facts.client,
                "a carried connection's service is not in this config: closing it");
            return;
        };
        #[cfg(target_os = "linux")]
        if service.relay.mode == crate::config::RelayMode::Ring {
            if let Some(ring) = self.ring_workers() {
                return ring.adopt(carried, service, &self.gate, &self.tracker);
            }
        }
        let handles = self.workers.handles();
        let Some(handle) = handles.get(NEXT.fetch_add(1, Relaxed) % handles.len().max(1)) else {
            return;
        };
        let run = session::resume(carried, service, self.gate.clone(), self.leaving.clone());
        handle.spawn(self.tracker.track_future(run));
    }

    /// Every service's and backend's totals now.
    pub(crate) fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for r in self.running.lock().iter() {
            let s = r.current.load_full();
            t.services.insert(s.name.to_string(), s.stats.totals());
            let backends = s
                .pool
                .all_backends()
                .iter()
                .map(|b| (b.addr.to_string(), b.stats.totals()))
                .collect();
            t.backends.insert(s.name.to_string(), backends);
        }
        t.deny = self.gate.deny.carried(tokio::time::Instant::now());
        t
    }

    /// Adds totals the process this one replaced counted, to the services and backends of the same
    /// names (and addresses) here.
    pub(crate) fn add_totals(&self, t: &Totals) {
        if !t.deny.is_empty() {
            let taken = self
                .gate
                .deny
                .carry_in(&t.deny, tokio::time::Instant::now());
            tracing::info!(
                carried = t.deny.len(),
                taken,
                "upgrade: deny list entries taken over"
            );
        }
        for r in self.running.lock().iter() {
            let s = r.current.load_full();
            if let Some(st) = t.services.get(&*s.name) {
                s.stats.add(st);
            }
            let Some(bs) = t.backends.get(&*s.name) else {
                continue;
            };
            for b in s.pool.all_backends() {
                if let Some(bt) = bs.get(&b.addr.to_string()) {
                    b.stats.add(bt);
                }
            }
        }
    }

    /// Connections this process holds now.
    pub(crate) fn open_connections(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until every connection this process holds has ended or been carried away.
    pub(crate) async fn all_gone(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_since_count_only_what_grew() {
        let mut a = Totals::default();
        a.services
            .insert("s".into(), [("accepted".to_string(), 5u64)].into());
        let mut b = a.clone();
        b.services
            .get_mut("s")
            .unwrap()
            .insert("accepted".into(), 9);
        b.services
            .insert("new".into(), [("accepted".to_string(), 2u64)].into());
        let d = b.since(&a);
        assert_eq!(d.services["s"]["accepted"], 4);
        assert_eq!(d.services["new"]["accepted"], 2);
    }

    #[test]
    fn totals_go_in_parts_that_each_fit_a_message() {
        let mut t = Totals::default();
        let counters: BTreeMap<String, u64> = (0..40)
            .map(|i| (format!("end.some_outcome_{i}"), u64::MAX))
            .collect();
        for s in 0..100 {
            let name = format!("service-with-a-long-name-{s}");
            t.services.insert(name.clone(), counters.clone());
            // A backend's four totals (BackendStats::totals), at their largest.
            let backend: BTreeMap<String, u64> = ["total", "failed", "bytes_up", "bytes_down"]
                .iter()
                .map(|k| (k.to_string(), u64::MAX))
                .collect();
            let bs = (0..1000)
                .map(|b| (format!("[2001:db8::{b:x}]:65535"), backend.clone()))
                .collect();
            t.backends.insert(name, bs);
        }
        // The longest entries the API makes: an IPv6 net, a reason of 256 bytes each escaped.
        t.deny = (0..1000u32)
            .map(|i| Denied {
                cidr: format!("2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}/128"),
                expires_ms: Some(u64::MAX),
                source: crate::admission::DenySource::Api,
                reason: "\"".repeat(256),
            })
            .collect();
        let parts = t.parts();
        let mut whole = Totals::default();
        for p in &parts {
            let json = serde_json::to_vec(p).unwrap();
            assert!(
                json.len() < crate::upgrade::wire::MAX_MESSAGE - 16,
                "{}",
                json.len()
            );
            for (s, c) in &p.services {
                whole.services.insert(s.clone(), c.clone());
            }
            for (s, bs) in &p.backends {
                whole
                    .backends
                    .entry(s.clone())
                    .or_default()
                    .extend(bs.clone());
            }
            whole.deny.extend(p.deny.iter().cloned());
        }
        assert_eq!(whole, t);
    }
}
