//! Counters rendered as Prometheus text (`GET /metrics`).
//!
//! Every number comes from the atomics the data plane already keeps (service, backend, DNS watcher);
//! rendering reads them without stopping anything. Names start with `sluicegate_`; counters end in
//! `_total`, durations are in seconds.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use crate::control::{Control, DrainProgress};
use crate::health::Health;
use crate::outcome::Outcome;
use crate::pool::{Backend, State, CONNECT_BUCKETS, WEIGHT_SCALE};
use crate::service::ServiceStats;

/// Label values escaped as the text format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", esc(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Renders every metric of the running server.
pub(crate) fn render(control: &Control) -> String {
    let mut o = Out {
        text: String::with_capacity(16 * 1024),
    };
    let services = control.services();

    o.family(
        "sluicegate_up",
        "gauge",
        "1 while the process serves; 0 once it drains.",
    );
    o.sample(
        "sluicegate_up",
        &[],
        u8::from(!control.readiness().is_draining()),
    );

    type ServiceGet = fn(&ServiceStats) -> u64;
    let per_service: [(&str, &str, &str, ServiceGet); 6] = [
        (
            "sluicegate_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            |s| s.accepted.load(Relaxed),
        ),
        (
            "sluicegate_connections_active",
            "gauge",
            "Client connections open now.",
            |s| s.active.load(Relaxed),
        ),
        (
            "sluicegate_connections_no_backend_total",
            "counter",
            "Clients closed at once because no backend was available.",
            |s| s.ended(Outcome::NoBackend),
        ),
        (
            "sluicegate_connections_connect_failed_total",
            "counter",
            "Clients whose every connect attempt failed.",
            |s| s.ended(Outcome::ConnectFailed),
        ),
        (
            "sluicegate_connections_over_limit_total",
            "counter",
            "Clients closed at once because max_connections were open.",
            |s| s.ended(Outcome::MaxConnections),
        ),
        (
            "sluicegate_connections_spliced_total",
            "counter",
            "Relayed connections in which a direction ran on splice.",
            |s| s.spliced.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in per_service {
        o.family(name, kind, help);
        for s in &services {
            o.sample(name, &[("service", &s.service.name)], get(&s.service.stats));
        }
    }
    o.family(
        "sluicegate_connections_ended_total",
        "counter",
        "Client connections by how they ended (the routing log's end values, refusals included).",
    );
    for s in &services {
        for e in Outcome::ALL {
            o.sample(
                "sluicegate_connections_ended_total",
                &[("service", &s.service.name), ("end", e.as_str())],
                s.service.stats.ended(e),
            );
        }
    }
    o.family(
        "sluicegate_service_bytes_total",
        "counter",
        "Bytes relayed by the service's finished connections, by direction (up = client to backend).",
    );
    for s in &services {
        for (dir, v) in [
            ("up", s.service.stats.bytes_up.load(Relaxed)),
            ("down", s.service.stats.bytes_down.load(Relaxed)),
        ] {
            o.sample(
                "sluicegate_service_bytes_total",
                &[("service", &s.service.name), ("direction", dir)],
                v,
            );
        }
    }
    o.family(
        "sluicegate_relay_info",
        "gauge",
        "The relay engine a service is configured with (auto, splice, copy).",
    );
    for s in &services {
        o.sample(
            "sluicegate_relay_info",
            &[
                ("service", &s.service.name),
                ("relay", s.service.relay.mode.as_str()),
                ("policy", s.service.policy.as_str()),
            ],
            1,
        );
    }

    // Per backend.
    let backends = control.backends();
    type BackendGet = fn(&Backend) -> u64;
    let per_backend: [(&str, &str, &str, BackendGet); 4] = [
        (
            "sluicegate_backend_connections_active",
            "gauge",
            "Connections to the backend open now (counted from the start of the connect).",
            |b| b.active(),
        ),
        (
            "sluicegate_backend_connections_total",
            "counter",
            "Connections established to the backend.",
            |b| b.stats.total.load(Relaxed),
        ),
        (
            "sluicegate_backend_connect_failures_total",
            "counter",
            "Connect attempts to the backend that failed.",
            |b| b.stats.failed.load(Relaxed),
        ),
        (
            "sluicegate_backend_weight",
            "gauge",
            "Configured weight.",
            |b| b.weight() as u64,
        ),
    ];
    for (name, kind, help, get) in per_backend {
        o.family(name, kind, help);
        for (svc, b) in &backends {
            let addr = b.addr.to_string();
            o.sample(name, &[("service", svc), ("backend", &addr)], get(b));
        }
    }
    o.family(
        "sluicegate_backend_effective_weight",
        "gauge",
        "Weight in use now (below the configured weight during slow start).",
    );
    for (svc, b) in &backends {
        let addr = b.addr.to_string();
        o.sample(
            "sluicegate_backend_effective_weight",
            &[("service", svc), ("backend", &addr)],
            b.eff_weight() as f64 / WEIGHT_SCALE as f64,
        );
    }
    o.family(
        "sluicegate_backend_bytes_total",
        "counter",
        "Bytes relayed to (up) and from (down) the backend, counted as they move.",
    );
    for (svc, b) in &backends {
        let addr = b.addr.to_string();
        for (dir, v) in [
            ("up", b.stats.bytes_up.load(Relaxed)),
            ("down", b.stats.bytes_down.load(Relaxed)),
        ] {
            o.sample(
                "sluicegate_backend_bytes_total",
                &[("service", svc), ("backend", &addr), ("direction", dir)],
                v,
            );
        }
    }
    o.family(
        "sluicegate_backend_health",
        "gauge",
        "1 for the backend's current health (unknown, healthy, unhealthy), 0 for the others.",
    );
    for (svc, b) in &backends {
        let addr = b.addr.to_string();
        let now = b.health();
        for h in [Health::Unknown, Health::Healthy, Health::Unhealthy] {
            o.sample(
                "sluicegate_backend_health",
                &[("service", svc), ("backend", &addr), ("health", h.as_str())],
                u8::from(now == h),
            );
        }
    }
    o.family(
        "sluicegate_backend_state",
        "gauge",
        "1 for the backend's current state (active, draining, removed), 0 for the others.",
    );
    for (svc, b) in &backends {
        let addr = b.addr.to_string();
        let now = b.state();
        for st in [State::Active, State::Draining, State::Removed] {
            o.sample(
                "sluicegate_backend_state",
                &[("service", svc), ("backend", &addr), ("state", st.as_str())],
                u8::from(now == st),
            );
        }
    }
    o.family(
        "sluicegate_backend_ejected",
        "gauge",
        "1 while the backend is passively ejected after consecutive connect failures.",
    );
    for (svc, b) in &backends {
        let addr = b.addr.to_string();
        o.sample(
            "sluicegate_backend_ejected",
            &[("service", svc), ("backend", &addr)],
            u8::from(b.is_ejected()),
        );
    }
    o.family(
        "sluicegate_backend_connect_seconds",
        "histogram",
        "Time of successful connects to the backend.",
    );
    for (svc, b) in &backends {
        let addr = b.addr.to_string();
        let (cum, sum, count) = b.stats.connect.cumulative();
        for (i, c) in cum.iter().enumerate() {
            let le = CONNECT_BUCKETS
                .get(i)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "+Inf".into());
            o.sample(
                "sluicegate_backend_connect_seconds_bucket",
                &[("service", svc), ("backend", &addr), ("le", &le)],
                c,
            );
        }
        o.sample(
            "sluicegate_backend_connect_seconds_sum",
            &[("service", svc), ("backend", &addr)],
            sum,
        );
        o.sample(
            "sluicegate_backend_connect_seconds_count",
            &[("service", svc), ("backend", &addr)],
            count,
        );
    }

    // DNS.
    o.family(
        "sluicegate_dns_queries_total",
        "counter",
        "DNS lookups of a backend name by result (records, empty, failed).",
    );
    for s in &services {
        for w in &s.watchers {
            for (result, v) in [
                ("records", w.stats.records.load(Relaxed)),
                ("empty", w.stats.empty.load(Relaxed)),
                ("failed", w.stats.failed.load(Relaxed)),
            ] {
                o.sample(
                    "sluicegate_dns_queries_total",
                    &[
                        ("service", &s.service.name),
                        ("name", &w.label),
                        ("result", result),
                    ],
                    v,
                );
            }
        }
    }

    // Drain progress.
    let drain: DrainProgress = control.drain_progress();
    o.family(
        "sluicegate_draining",
        "gauge",
        "1 while the process drains after a stop signal.",
    );
    o.sample("sluicegate_draining", &[], u8::from(drain.draining));
    o.family(
        "sluicegate_drain_remaining_connections",
        "gauge",
        "Client connections still open during the drain.",
    );
    o.sample(
        "sluicegate_drain_remaining_connections",
        &[],
        drain.remaining,
    );
    o.family(
        "sluicegate_drain_deadline_seconds",
        "gauge",
        "Seconds until the drain deadline cuts what remains (0 when not draining).",
    );
    o.sample(
        "sluicegate_drain_deadline_seconds",
        &[],
        drain.deadline_in.map(|d| d.as_secs_f64()).unwrap_or(0.0),
    );
    o.family(
        "sluicegate_oldest_connection_seconds",
        "gauge",
        "Age of the oldest open client connection, per service.",
    );
    for s in &services {
        o.sample(
            "sluicegate_oldest_connection_seconds",
            &[("service", &s.service.name)],
            s.service
                .stats
                .sessions
                .oldest_age()
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
    }
    o.family(
        "sluicegate_config_reloads_total",
        "counter",
        "Config reloads by result (applied, rejected).",
    );
    let (ok, bad) = control.reload_counts();
    o.sample(
        "sluicegate_config_reloads_total",
        &[("result", "applied")],
        ok,
    );
    o.sample(
        "sluicegate_config_reloads_total",
        &[("result", "rejected")],
        bad,
    );
    o.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(esc("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
