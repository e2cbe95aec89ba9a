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
        "sluicegate_build_info",
        "gauge",
        "The running build: always 1, with the version and target as labels.",
    );
    o.sample(
        "sluicegate_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            (
                "target",
                &format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            ),
        ],
        1,
    );
    o.family(
        "sluicegate_instance_info",
        "gauge",
        "Always 1: which balancer replica this is (its host's name), to tell replicas apart.",
    );
    o.sample(
        "sluicegate_instance_info",
        &[("hostname", control.instance())],
        1,
    );
    o.family(
        "sluicegate_serving",
        "gauge",
        "1 while the process serves; 0 once it drains.",
    );
    o.sample(
        "sluicegate_serving",
        &[],
        u8::from(!control.readiness().is_draining()),
    );
    process_metrics(&mut o);
    o.family(
        "sluicegate_connections_open",
        "gauge",
        "Client connections open now over every service (what the top-level max_connections caps).",
    );
    o.sample("sluicegate_connections_open", &[], control.gate.open());

    type ServiceGet = fn(&ServiceStats) -> u64;
    let per_service: [(&str, &str, &str, ServiceGet); 9] = [
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
            "sluicegate_queue_waiting",
            "gauge",
            "Clients waiting for a backend below its max_connections (queue).",
            |s| s.queue.waiting(),
        ),
        (
            "sluicegate_source_entries",
            "gauge",
            "Client addresses the per-source limits are tracking now (bounded).",
            |s| s.sources.len() as u64,
        ),
        (
            "sluicegate_connections_spliced_total",
            "counter",
            "Relayed connections in which a direction ran on splice.",
            |s| s.spliced.load(Relaxed),
        ),
        (
            "sluicegate_connections_uring_total",
            "counter",
            "Relayed connections that ran on the io_uring engine.",
            |s| s.uring.load(Relaxed),
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

    // Replicas sluicegate runs.
    o.family(
        "sluicegate_replicas",
        "gauge",
        "Replicas sluicegate runs for the service, by state (running, draining).",
    );
    for s in &services {
        if let Some(set) = control.replicas(&s.service.name) {
            let (running, draining) = set.counts();
            for (state, n) in [("running", running), ("draining", draining)] {
                o.sample(
                    "sluicegate_replicas",
                    &[("service", &s.service.name), ("state", state)],
                    n,
                );
            }
        }
    }
    o.family(
        "sluicegate_replica_replacements_total",
        "counter",
        "Replicas replaced because their container stopped, vanished or stayed unhealthy.",
    );
    for s in &services {
        if let Some(set) = control.replicas(&s.service.name) {
            o.sample(
                "sluicegate_replica_replacements_total",
                &[("service", &s.service.name)],
                set.replaced.load(Relaxed),
            );
        }
    }
    o.family(
        "sluicegate_docker_errors_total",
        "counter",
        "Docker Engine calls that failed (unreachable, refused, timed out).",
    );
    for s in &services {
        if let Some(set) = control.replicas(&s.service.name) {
            o.sample(
                "sluicegate_docker_errors_total",
                &[("service", &s.service.name)],
                set.docker_errors.load(Relaxed),
            );
        }
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

/// What `/proc` says about this process. Linux reports CPU times in USER_HZ, which is 100 on every
/// architecture Linux supports for user space.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    threads: Option<u64>,
}

const USER_HZ: f64 = 100.0;

/// The fields after the command name of `/proc/PID/stat` (the name may contain spaces and parentheses).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A `Name:   N kB` line of `/proc/PID/status`, in bytes (or the bare number for counts).
fn status_value(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let mut parts = line[name.len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    Some(if parts.next() == Some("kB") {
        n * 1024
    } else {
        n
    })
}

fn process_stats() -> ProcessStats {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (stat, status, proc_stat) = (
        read("/proc/self/stat"),
        read("/proc/self/status"),
        read("/proc/stat"),
    );
    let f = stat_fields(&stat);
    // After the name: state is field 3 of the man page, so utime (14) is index 11 here, stime 12,
    // starttime (22) 19.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let boot = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    ProcessStats {
        cpu_seconds: ticks(11).zip(ticks(12)).map(|(u, s)| (u + s) / USER_HZ),
        start_time_seconds: boot.zip(ticks(19)).map(|(b, t)| b + t / USER_HZ),
        resident_bytes: status_value(&status, "VmRSS:"),
        virtual_bytes: status_value(&status, "VmSize:"),
        threads: status_value(&status, "Threads:"),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds: rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft),
    }
}

/// The process metrics every Prometheus client library exports, under their usual names.
fn process_metrics(o: &mut Out) {
    let p = process_stats();
    let rows: [(&str, &str, &str, Option<f64>); 7] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            p.cpu_seconds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            p.start_time_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, in bytes.",
            p.resident_bytes.map(|v| v as f64),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, in bytes.",
            p.virtual_bytes.map(|v| v as f64),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            "gauge",
            "The soft limit on open file descriptors.",
            p.max_fds.map(|v| v as f64),
        ),
        (
            "process_threads",
            "gauge",
            "Threads of the process.",
            p.threads.map(|v| v as f64),
        ),
    ];
    for (name, kind, help, value) in rows {
        if let Some(v) = value {
            o.family(name, kind, help);
            o.sample(name, &[], v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_past_the_command_name() {
        let stat = "1234 (sluice gate (w)) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 5 0 1000 123 456";
        let f = stat_fields(stat);
        assert_eq!((f[11], f[12], f[19]), ("250", "50", "1000"));
        let status = "Name:\tsluicegate\nVmSize:\t  2048 kB\nVmRSS:\t    12 kB\nThreads:\t5\n";
        assert_eq!(status_value(status, "VmRSS:"), Some(12 * 1024));
        assert_eq!(status_value(status, "Threads:"), Some(5));
        assert_eq!(status_value(status, "VmSwap:"), None);
        let me = process_stats();
        assert!(me.cpu_seconds.is_some() && me.start_time_seconds.is_some());
        assert!(me.open_fds.unwrap() > 2 && me.resident_bytes.unwrap() > 0);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(esc("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
