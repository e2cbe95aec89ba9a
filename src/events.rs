//! State changes as events: every transition a pool, a service, the replicas or the control logs is
//! also published here, for the admin API's event stream (`GET /events`) and the dashboard.
//!
//! Every event is an [`Event`]: the one list of what `/events` may say, each variant built by the
//! subsystem the change belongs to. Its JSON is the variant's name as `type` (snake case), its
//! fields, and `at_ms`; docs/admin-api.md's table lists the same (a test checks it).
//!
//! Publishing never blocks and never fails: a broadcast channel keeps the latest [`CAPACITY`] events, and
//! a subscriber that falls behind skips what it missed (it still gets the next stats frame).

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::util::unix_ms;

/// Events kept for slow subscribers.
const CAPACITY: usize = 1024;

/// Everything `/events` streams as `event: change`. Borrowed fields: an event is serialised once,
/// when published, and only when someone listens.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Event<'a> {
    /// The server serves (listeners bound, first DNS answers and probes in).
    Ready,
    /// The stop signal arrived: `in_flight` connections, cut after `deadline_s`.
    Draining { in_flight: usize, deadline_s: f64 },
    /// A reload was applied (`report`, as `POST /reload` answers it) or rejected (`error`).
    Reload {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        report: Option<serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The service went into (false) or out of (true) "no backend available".
    ServiceBackends { service: &'a str, available: bool },
    /// A source claimed a new backend; `sources` as in the backend object (`dns:NAME:PORT`, ...).
    BackendAdded {
        service: &'a str,
        backend: SocketAddr,
        weight: u32,
        tier: u32,
        sources: Vec<String>,
    },
    /// No source claims it any more; its `sessions` follow `on_removed` (`keep`, `drain`, `close`).
    BackendRemoved {
        service: &'a str,
        backend: SocketAddr,
        sessions: u64,
        on_removed: &'static str,
    },
    /// A removed backend's drain deadline passed: its `sessions` are cut.
    BackendDrainDeadline {
        service: &'a str,
        backend: SocketAddr,
        sessions: u64,
    },
    /// Its weight or tier changed.
    BackendWeight {
        service: &'a str,
        backend: SocketAddr,
        weight: u32,
        tier: u32,
    },
    /// The admin API set it `active`, `draining` or `maint`.
    BackendState {
        service: &'a str,
        backend: SocketAddr,
        state: &'static str,
    },
    /// Active health changed (`unknown`, `healthy`, `unhealthy`), with the failed probe's error.
    BackendHealth {
        service: &'a str,
        backend: SocketAddr,
        health: &'static str,
        was: &'static str,
        error: Option<&'a str>,
    },
    /// Passively ejected after `consecutive_fails` connect failures.
    BackendEjected {
        service: &'a str,
        backend: SocketAddr,
        consecutive_fails: u32,
    },
    /// The ejection's cool-down ended.
    BackendReturned {
        service: &'a str,
        backend: SocketAddr,
    },
    /// Its agent said something new: `says` (`up`, `down`, `drain`, `maint`) and its weight share.
    BackendAgent {
        service: &'a str,
        backend: SocketAddr,
        says: &'static str,
        was: &'static str,
        weight_pct: u32,
    },
    /// Another tier takes new connections (`reason`: `start`, `failover`, `failback`,
    /// `failback_after`, `operator`); with `held`, a better tier is eligible and `failback` keeps
    /// traffic on `serving`.
    ServiceTier {
        service: &'a str,
        serving: u32,
        was: Option<u32>,
        reason: &'static str,
        held: bool,
    },
    /// A client source broke the service's per-source limits `breaches` times within
    /// `limits.ban.within`: refused at accept for `for_s` seconds (`source`: the deny list's entry,
    /// its address, an IPv6 one by /64); `recorded` false: the deny list was full, so it was not.
    SourceBanned {
        service: &'a str,
        source: String,
        breaches: u32,
        for_s: f64,
        recorded: bool,
    },
    /// The runtime deny list changed through the API (`action`: `added`, `removed`).
    DenyChanged {
        cidr: String,
        action: &'static str,
        expires: Option<String>,
    },
    /// sluicegate started a replica's container; `replaces` names the container it replaced.
    ReplicaStarted {
        service: &'a str,
        replica: &'a str,
        container: &'a str,
        address: SocketAddr,
        replaces: Option<&'a str>,
    },
    /// Found running at a check (after a restart, say) and taken in.
    ReplicaAdopted {
        service: &'a str,
        replica: &'a str,
        container: &'a str,
    },
    ReplicaRemoved {
        service: &'a str,
        replica: &'a str,
        container: &'a str,
    },
    /// The old `container` of `replica` is replaced, for `reason`.
    ReplicaReplaced {
        service: &'a str,
        replica: &'a str,
        container: &'a str,
        reason: String,
    },
    /// The replacement budget (`per_minute`) is spent: healing waits.
    ReplicaHealPaused { service: &'a str, per_minute: u32 },
    /// The autoscaler scales `up` or `down` from `from` replicas to `to`.
    Autoscale {
        service: &'a str,
        direction: &'static str,
        from: u32,
        to: u32,
        metric: &'static str,
        per_replica: f64,
        target: f64,
        window_s: f64,
    },
    /// A Docker call (`action`) failed.
    DockerError {
        service: &'a str,
        action: &'a str,
        error: String,
    },
    /// An operator ended connection `id` (`DELETE /connections`), `how` (`reset`, `fin`); `by`
    /// names who asked.
    ConnectionKilled {
        id: u64,
        service: &'a str,
        client: SocketAddr,
        backend: Option<SocketAddr>,
        how: &'static str,
        by: &'a str,
    },
}

/// An event as sent: the event and the time.
#[derive(Serialize)]
struct Stamped<'e, 'a> {
    #[serde(flatten)]
    event: &'e Event<'a>,
    at_ms: u64,
}

/// A cheap handle to publish events; clones share one channel.
#[derive(Clone, Debug)]
pub(crate) struct EventBus(broadcast::Sender<Arc<str>>);

impl Default for EventBus {
    fn default() -> Self {
        EventBus(broadcast::channel(CAPACITY).0)
    }
}

impl EventBus {
    /// Publishes `event` with the time; serialised once for every subscriber. Without subscribers
    /// this costs nothing but building the event, and events are rare.
    pub(crate) fn publish(&self, event: Event<'_>) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let stamped = Stamped {
            event: &event,
            at_ms: unix_ms(),
        };
        // Nothing in an event fails to serialise (no maps with non-string keys).
        if let Ok(text) = serde_json::to_string(&stamped) {
            let _ = self.0.send(text.into());
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;

    const SERVICE: &str = "web";
    const BACKEND: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
        9000,
    );

    /// One of every variant, with every optional field set.
    fn examples() -> Vec<Event<'static>> {
        let mut all = server_and_backend_examples();
        all.extend(replica_examples());
        all
    }

    /// The server's, the services' and the backends' events.
    fn server_and_backend_examples() -> Vec<Event<'static>> {
        let (service, backend) = (SERVICE, BACKEND);
        vec![
            Event::Ready,
            Event::Draining {
                in_flight: 1,
                deadline_s: 30.0,
            },
            Event::Reload {
                ok: true,
                report: Some(Value::Null),
                error: Some("x".into()),
            },
            Event::ServiceBackends {
                service,
                available: true,
            },
            Event::BackendAdded {
                service,
                backend,
                weight: 1,
                tier: 0,
                sources: vec!["static".into()],
            },
            Event::BackendRemoved {
                service,
                backend,
                sessions: 0,
                on_removed: "drain",
            },
            Event::BackendDrainDeadline {
                service,
                backend,
                sessions: 0,
            },
            Event::BackendWeight {
                service,
                backend,
                weight: 2,
                tier: 1,
            },
            Event::BackendState {
                service,
                backend,
                state: "draining",
            },
            Event::BackendHealth {
                service,
                backend,
                health: "unhealthy",
                was: "healthy",
                error: Some("refused"),
            },
            Event::BackendEjected {
                service,
                backend,
                consecutive_fails: 3,
            },
            Event::BackendReturned { service, backend },
            Event::BackendAgent {
                service,
                backend,
                says: "drain",
                was: "up",
                weight_pct: 50,
            },
            Event::ServiceTier {
                service,
                serving: 1,
                was: Some(0),
                reason: "failover",
                held: false,
            },
        ]
    }

    /// The replicas' and Docker's events.
    fn replica_examples() -> Vec<Event<'static>> {
        let (service, backend) = (SERVICE, BACKEND);
        let (replica, container) = ("web-1", "sg-web-1");
        vec![
            Event::ReplicaStarted {
                service,
                replica,
                container,
                address: backend,
                replaces: Some("sg-web-0"),
            },
            Event::ReplicaAdopted {
                service,
                replica,
                container,
            },
            Event::ReplicaRemoved {
                service,
                replica,
                container,
            },
            Event::ReplicaReplaced {
                service,
                replica,
                container,
                reason: "exited".into(),
            },
            Event::ReplicaHealPaused {
                service,
                per_minute: 6,
            },
            Event::Autoscale {
                service,
                direction: "up",
                from: 1,
                to: 2,
                metric: "active_connections",
                per_replica: 10.0,
                target: 5.0,
                window_s: 30.0,
            },
            Event::DockerError {
                service,
                action: "start",
                error: "no".into(),
            },
            Event::ConnectionKilled {
                id: 7,
                service,
                client: BACKEND,
                backend: Some(BACKEND),
                how: "reset",
                by: "admin",
            },
            Event::SourceBanned {
                service,
                source: "192.0.2.1/32".into(),
                breaches: 5,
                for_s: 600.0,
                recorded: true,
            },
            Event::DenyChanged {
                cidr: "203.0.113.0/24".into(),
                action: "added",
                expires: Some("2026-11-30T06:00:00Z".into()),
            },
        ]
    }

    /// Which variant `e` is; a new variant does not compile until it is given the next number
    /// here, and then the test fails until `examples` has one.
    fn variant(e: &Event) -> usize {
        match e {
            Event::Ready => 0,
            Event::Draining { .. } => 1,
            Event::Reload { .. } => 2,
            Event::ServiceBackends { .. } => 3,
            Event::BackendAdded { .. } => 4,
            Event::BackendRemoved { .. } => 5,
            Event::BackendDrainDeadline { .. } => 6,
            Event::BackendWeight { .. } => 7,
            Event::BackendState { .. } => 8,
            Event::BackendHealth { .. } => 9,
            Event::BackendEjected { .. } => 10,
            Event::BackendReturned { .. } => 11,
            Event::BackendAgent { .. } => 12,
            Event::ServiceTier { .. } => 13,
            Event::ReplicaStarted { .. } => 14,
            Event::ReplicaAdopted { .. } => 15,
            Event::ReplicaRemoved { .. } => 16,
            Event::ReplicaReplaced { .. } => 17,
            Event::ReplicaHealPaused { .. } => 18,
            Event::Autoscale { .. } => 19,
            Event::DockerError { .. } => 20,
            Event::ConnectionKilled { .. } => 21,
            Event::SourceBanned { .. } => 22,
            Event::DenyChanged { .. } => 23,
        }
    }

    /// The `/events` table of docs/admin-api.md: per `type`, the fields it names (backquoted, outside
    /// parentheses).
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let mut rows = BTreeMap::new();
        for row in crate::util::doc_table("admin-api.md", "| `type` | fields |") {
            let mut depth = 0;
            let mut outside = String::new();
            for c in row[1].chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    c if depth == 0 => outside.push(c),
                    _ => {}
                }
            }
            let names = outside.split('`').skip(1).step_by(2).map(String::from);
            rows.insert(row[0].trim_matches('`').to_string(), names.collect());
        }
        rows
    }

    #[test]
    fn every_event_is_documented_with_its_fields() {
        let examples = examples();
        let variants: Vec<usize> = examples.iter().map(variant).collect();
        assert_eq!(variants, (0..variants.len()).collect::<Vec<_>>());
        let mut sent = BTreeMap::new();
        for e in &examples {
            let v = serde_json::to_value(Stamped { event: e, at_ms: 1 }).unwrap();
            let mut fields: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
            assert!(fields.remove("type") && fields.remove("at_ms"), "{v}");
            sent.insert(v["type"].as_str().unwrap().to_string(), fields);
        }
        assert_eq!(sent, documented());
    }

    #[tokio::test]
    async fn subscribers_get_the_event_as_json_with_its_time() {
        let bus = EventBus::default();
        bus.publish(Event::Ready); // nobody listens: dropped
        let mut rx = bus.subscribe();
        bus.publish(Event::BackendReturned {
            service: "web",
            backend: SocketAddr::from(([127, 0, 0, 1], 80)),
        });
        let v: Value = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(v["type"], "backend_returned");
        assert_eq!(v["service"], "web");
        assert_eq!(v["backend"], "127.0.0.1:80");
        assert!(v["at_ms"].as_u64().unwrap() > 0);
        assert!(rx.try_recv().is_err(), "nothing was kept from before");
    }
}
