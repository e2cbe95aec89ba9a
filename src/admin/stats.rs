//! The numbers the admin API shows: per-backend views, and a sampler that turns the counters into a
//! stats frame with rates once a second (for `/stats`, the event stream and the dashboard's charts).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::outcome::Outcome;
use crate::pool::{Backend, Source, State};
use crate::util::{lock, unix_ms};

/// Frames kept for the dashboard's charts: five minutes.
const HISTORY: usize = 300;
const PERIOD: Duration = Duration::from_secs(1);

/// One backend as JSON: its view plus the service it belongs to.
pub(super) fn backend_json(service: &str, b: &Backend) -> Value {
    let mut v = serde_json::to_value(b.view()).unwrap_or(Value::Null);
    v["service"] = Value::from(service);
    let probes = v["probes"].as_array().cloned().unwrap_or_default();
    v["last_probe"] = probes.last().cloned().unwrap_or(Value::Null);
    // The flat names scripts read (docs/admin-api.md): the primary source as `static`, `dns` (with
    // `dns_name`) or `api`, and bytes in (client → backend) / out, failed connects.
    let primary = b.sources().into_iter().next();
    let (source, dns_name) = match &primary {
        Some(Source::Dns(name)) => ("dns", Value::from(&**name)),
        Some(Source::Api) => ("api", Value::Null),
        Some(Source::Docker) => ("docker", Value::Null),
        _ => ("static", Value::Null),
    };
    v["source"] = Value::from(source);
    v["dns_name"] = dns_name;
    v["bytes_in"] = v["bytes_up"].clone();
    v["bytes_out"] = v["bytes_down"].clone();
    v["failed_connects"] = v["failed"].clone();
    v
}

/// What the replicas of every service say about themselves, by (service, address).
pub(super) fn replica_info(c: &Control) -> HashMap<(Arc<str>, SocketAddr), Value> {
    let mut m = HashMap::new();
    for view in c.services() {
        let name = view.service.name.clone();
        if let Some(set) = c.replicas(&name) {
            for r in set.replicas() {
                if let Some(a) = r.address {
                    m.insert(
                        (name.clone(), a),
                        serde_json::to_value(&r).unwrap_or(Value::Null),
                    );
                }
            }
        }
    }
    m
}

/// Every backend of every service (members and removed ones still holding sessions); a replica
/// sluicegate runs also says which (`replica`: hostname, container, state, what it replaced and why).
pub(super) fn backends(c: &Control) -> Vec<Value> {
    let replicas = replica_info(c);
    let instance = c.instance();
    c.backends()
        .iter()
        .map(|(svc, b)| {
            let mut v = backend_json(svc, b);
            v["instance"] = Value::from(instance);
            if let Some(r) = replicas.get(&(svc.clone(), b.addr)) {
                v["replica"] = r.clone();
            }
            v
        })
        .collect()
}

/// Jain's fairness index of the connections each backend got against its weight: 1 when every
/// backend's share matches its weight, down to 1/n when one backend got everything.
pub(super) fn jain(totals_and_weights: &[(u64, u32)]) -> Option<f64> {
    let x: Vec<f64> = totals_and_weights
        .iter()
        .map(|&(t, w)| t as f64 / w.max(1) as f64)
        .collect();
    let sum: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    (sum > 0.0).then(|| sum * sum / (x.len() as f64 * sq))
}

/// Computes a frame every second; keeps the latest and the last five minutes.
#[derive(Clone)]
pub(super) struct Sampler {
    latest: watch::Receiver<Arc<str>>,
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    latest: Value,
    history: VecDeque<Value>,
}

/// Counters at the previous frame, for rates.
#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    services: HashMap<Arc<str>, (u64, u64)>,
    backends: HashMap<(Arc<str>, SocketAddr), (u64, u64)>,
}

impl Sampler {
    /// Starts sampling on the current (admin) runtime until `stop`.
    pub(super) fn start(control: Arc<Control>, stop: CancellationToken) -> Sampler {
        let mut prev = Previous::default();
        let first = frame(&control, &mut prev);
        let (tx, rx) = watch::channel::<Arc<str>>(first.to_string().into());
        let shared = Arc::new(Mutex::new(Shared {
            latest: first,
            history: VecDeque::with_capacity(HISTORY),
        }));
        let s = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let f = frame(&control, &mut prev);
                let text: Arc<str> = f.to_string().into();
                {
                    let mut sh = lock(&s);
                    if sh.history.len() == HISTORY {
                        sh.history.pop_front();
                    }
                    sh.history.push_back(compact(&f));
                    sh.latest = f;
                }
                let _ = tx.send(text);
            }
        });
        Sampler { latest: rx, shared }
    }

    pub(super) fn latest_value(&self) -> Value {
        lock(&self.shared).latest.clone()
    }

    pub(super) fn history(&self) -> Value {
        Value::Array(lock(&self.shared).history.iter().cloned().collect())
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<str>> {
        self.latest.clone()
    }
}

/// The chart data of a frame: time and rates only.
fn compact(f: &Value) -> Value {
    let services: Vec<Value> = f["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let backends: Vec<Value> = s["backends"]
                        .as_array()
                        .map(|b| {
                            b.iter()
                                .map(|b| {
                                    json!({"address": b["address"], "active": b["active"],
                                       "conn_rate": b["conn_rate"], "bytes_rate": b["bytes_rate"]})
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    json!({"name": s["name"], "active": s["active"], "conn_rate": s["conn_rate"],
                           "bytes_rate": s["bytes_rate"], "backends": backends})
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"at_ms": f["at_ms"], "services": services})
}

fn rate(now: u64, before: Option<u64>, secs: f64) -> f64 {
    match before {
        Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
        _ => 0.0,
    }
}

/// Everything `/stats` shows, with rates since the previous frame.
fn frame(c: &Control, prev: &mut Previous) -> Value {
    let now = Instant::now();
    let secs = prev
        .at
        .map(|t| now.duration_since(t).as_secs_f64())
        .unwrap_or(0.0);
    prev.at = Some(now);
    let mut services = Vec::new();
    for view in c.services() {
        let s = &view.service;
        let st = &s.stats;
        let accepted = st.accepted.load(Relaxed);
        let mut bytes_total = 0;
        let mut backends = Vec::new();
        let mut fairness_input = Vec::new();
        for b in s.pool.all_backends() {
            let total = b.stats.total.load(Relaxed);
            let bytes = b.stats.bytes_up.load(Relaxed) + b.stats.bytes_down.load(Relaxed);
            bytes_total += bytes;
            let key = (s.name.clone(), b.addr);
            let before = prev.backends.insert(key, (total, bytes));
            let mut v = backend_json(&s.name, &b);
            v["conn_rate"] = json!(rate(total, before.map(|p| p.0), secs));
            v["bytes_rate"] = json!(rate(bytes, before.map(|p| p.1), secs));
            if b.state() != State::Removed {
                fairness_input.push((total, b.weight()));
            }
            backends.push(v);
        }
        let before = prev
            .services
            .insert(s.name.clone(), (accepted, bytes_total));
        let ends: serde_json::Map<String, Value> = Outcome::ALL
            .iter()
            .map(|e| (e.as_str().to_string(), json!(st.ended(*e))))
            .collect();
        services.push(json!({
            "name": &*s.name,
            "listen": view.listen,
            "policy": s.policy.as_str(),
            "relay": s.relay.mode.as_str(),
            "accepted": accepted,
            "active": st.active.load(Relaxed),
            "no_backend": st.ended(Outcome::NoBackend),
            "connect_failed": st.ended(Outcome::ConnectFailed),
            "over_limit": st.ended(Outcome::MaxConnections),
            "spliced": st.spliced.load(Relaxed),
            "uring": st.uring.load(Relaxed),
            "ends": ends,
            "bytes_up": st.bytes_up.load(Relaxed),
            "bytes_down": st.bytes_down.load(Relaxed),
            "conn_rate": rate(accepted, before.map(|p| p.0), secs),
            "bytes_rate": rate(bytes_total, before.map(|p| p.1), secs),
            "oldest_connection_s": st.sessions.oldest_age().map(|d| d.as_secs_f64()),
            "fairness": jain(&fairness_input),
            "replicas": c.replicas(&s.name).map(|set| serde_json::to_value(set.replicas()).unwrap_or(Value::Null)),
            "dns": view.watchers.iter().map(|w| json!({
                "name": &*w.label,
                "queries": w.stats.queries.load(Relaxed),
                "records": w.stats.records.load(Relaxed),
                "empty": w.stats.empty.load(Relaxed),
                "failed": w.stats.failed.load(Relaxed),
            })).collect::<Vec<_>>(),
            "backends": backends,
        }));
    }
    // Forget backends that are gone, so the map cannot grow with address churn.
    prev.backends.retain(|(svc, addr), _| {
        services.iter().any(|s| {
            s["name"].as_str() == Some(svc)
                && s["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["address"] == json!(addr)))
        })
    });
    let d = c.drain_progress();
    json!({
        "at_ms": unix_ms(),
        "instance": c.instance(),
        "ready": c.readiness().is_ready(),
        "draining": d.draining,
        "drain": d,
        "reloads": {"applied": c.reload_counts().0, "rejected": c.reload_counts().1},
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index() {
        assert_eq!(jain(&[(0, 1), (0, 1)]), None);
        assert!((jain(&[(100, 1), (100, 1), (100, 1)]).unwrap() - 1.0).abs() < 1e-9);
        // 1:2:7 weights served exactly: fair.
        assert!((jain(&[(100, 1), (200, 2), (700, 7)]).unwrap() - 1.0).abs() < 1e-9);
        // everything on one of four: 1/4
        assert!((jain(&[(100, 1), (0, 1), (0, 1), (0, 1)]).unwrap() - 0.25).abs() < 1e-9);
    }
}
