//! sluicegate: a layer-4 load balancer for TCP and UDP.
//!
//! A connection goes accept → (admit) → select → connect → relay → account, on the data-plane
//! threads; the control plane keeps what it selects from current; the surfaces show and steer both.
//!
//! **Data plane** (one single-threaded runtime per core, `workers`):
//! - `workers`: the data-plane threads.
//! - `listener`: binds the listening sockets and runs the accept loop, which never dies; one tracing
//!   span per connection.
//! - `ring`: the default data plane, the ring workers: one thread per core running its own
//!   io_uring loop (accept, connect, relay and close; `ring/mod.rs` and its steps), its host that
//!   admits, picks and accounts through `session` (`host.rs`), and the threads (`workers.rs`); one
//!   tracing span per connection. What it cannot serve (TLS, a shared address) runs on `listener`'s
//!   tokio side.
//! - `udp`: UDP services (`protocol: udp`): each listen address's loop (datagrams read in
//!   batches, admitted, balanced in sessions), the sessions' tasks, the bounded session table; one
//!   tracing span per session.
//! - `session`: one client's life: on a shared address its route (the PROXY header, the TLS
//!   ClientHello), the PROXY header in, admission, TLS termination, select, connect with retry on
//!   another backend, the PROXY header out, TLS origination, relay, account.
//! - `route`: the routes of a listen address: which service a client's server name and protocols
//!   choose (pure), and the table the accept loops read.
//! - `tls`: TLS with rustls: the ClientHello parser (pure), termination, origination, PEM files.
//! - `admission`: who may come in and how much they may take: the top-level cap, allow and deny
//!   lists, per-source limits, per-backend caps and their queue.
//! - [`proxy_protocol`]: PROXY protocol v1 and v2 headers, parsed and written.
//! - [`service`]: a configured service at run time: settings, pool, counters.
//! - [`pool`]: a service's backends and their state machines, membership by difference, eligibility
//!   (health, passive ejection, drain, slow start), and the snapshot the hot path reads.
//! - `balance`: the selection policies, pure, over any backend-like `Candidate`.
//! - `relay`: the contract every engine keeps (half-close, resets, timeouts, the quiet point an
//!   upgrade stops at), the tokio engines (copy, splice, epoll), and what io_uring is to the process
//!   (`relay/uring/`: whether it is usable, a ring's setup, the provided buffers), which the ring
//!   workers build on.
//! - [`accesslog`]: the access log (`log.access`): one line per connection, at its end.
//! - [`outcome`]: how a connection ended, one type for the log, the counters and the metrics.
//!
//! **Control plane** (the control runtime, on the main thread):
//! - `control`: the registry of running services, start-up, reload as a pure plan and its
//!   application, the drain on stop.
//! - `health`: one active probe and the rise/fall machine that returns transitions.
//! - `discovery`: DNS names re-resolved on a timer, and Docker containers found by their labels and
//!   followed through the Engine's events, into claims on a pool.
//! - `replicas`: backend containers sluicegate runs through the Docker Engine.
//! - `docker`: the Docker Engine API client (list, events, run, stop, remove), every call bounded,
//!   its errors typed; what `replicas` and `discovery` speak to the Engine through.
//! - `events`: the state-change stream, one `Event` type for every kind.
//!
//! **Surfaces**:
//! - [`app`]: the application root: binds every service and the admin API, serves, drains, and
//!   upgrades in place.
//! - [`upgrade`]: replacing the binary: the new process started and handed every listening socket,
//!   the connections carried over at a quiet point, the counters sent along (`upgrade/wire.rs`: the
//!   versioned messages between the two).
//! - `admin`: the admin HTTP API, `/metrics`, the event stream and the dashboard, on a thread of its
//!   own.
//! - [`logging`]: log output (the application and routing streams, never blocking a worker).
//! - [`syslog`]: the routing log's copy for a syslog collector (RFC 5424 over UDP, TCP or a unix
//!   socket), a destination of `logging`'s writer threads.
//! - [`selfcheck`]: the `healthcheck` subcommand's client (asks a running sluicegate's `/ready`).
//!
//! **Shared**: [`config`] (the YAML schema and its validation), `connections` (the live
//! connections and UDP sessions of the process, each one's view written by its engine, listed and
//! killed through the admin API), [`sockets`] (listening sockets given
//! to the process by the one it replaced or by systemd, taken before binding), `metrics` (how a subsystem declares
//! the metrics it exports, a `Table` next to its typed view, and the Prometheus text format; the admin
//! API asks each subsystem for its samples) and `util` (small pieces every layer uses).
//!
//! ## Import order
//!
//! Each line imports only from the lines below it (`python3 .ci/modgraph.py` checks that this list
//! names every module once and that no import goes up or sideways):
//!
//! 1. `app`
//! 2. `admin`, `upgrade`
//! 3. `control`
//! 4. `ring`
//! 5. `listener`, `udp`
//! 6. `session`
//! 7. `route`
//! 8. `service`
//! 9. `admission`, `replicas`
//! 10. `logging`, `pool`, `tls`
//! 11. `accesslog`, `balance`, `discovery`, `events`, `health`, `proxy_protocol`, `relay`, `selfcheck`, `syslog`
//! 12. `docker`
//! 13. `config`, `connections`, `metrics`, `outcome`, `sockets`, `util`, `workers`
//!
//! ## Where `unsafe` may be
//!
//! The crate denies `unsafe_code`. Only the data plane's kernel-facing code opts in, each block with
//! its safety argument, behind types that own what the kernel may touch (`python3 .ci/unsafe.py`
//! fails on an `unsafe` anywhere else):
//! - `relay/uring/`: the provided-buffer pool's memory, shared with the kernel (a buffer read only through
//!   the token a completion makes), and the probe's one entry.
//! - `ring/submit.rs`: the ring workers' one submit type, which builds every entry (pointing the
//!   kernel at sockets and buffers the loop keeps alive until their last completion), counts it in
//!   its connection and pushes it, and takes from each completion what the kernel made for it.
//! - `ring/tests.rs`: what the ring's tests do to the kernel directly (a ring of their own, the
//!   descriptor limit, a duplicated descriptor, urgent data).
//! - `relay/splice.rs`: `pipe2`, `fcntl` and `splice(2)` on borrowed descriptors.
//! - `relay/tcp_info.rs`: `getsockopt(TCP_INFO)` into a struct of its own.
//!
//! `docs/architecture.md` walks one connection through these modules by file and function.
//! `main.rs` only parses the command line, loads the config, sets up logging and signals, and runs an
//! [`app::Server`]; tests drive the `Server` directly.

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(unreachable_pub)]

pub mod accesslog;
mod admin;
mod admission;
pub mod app;
mod balance;
pub mod config;
mod connections;
mod control;
mod discovery;
mod docker;
mod events;
pub mod health;
mod listener;
pub mod logging;
mod metrics;
pub mod outcome;
pub mod pool;
pub mod proxy_protocol;
mod relay;
mod replicas;
#[cfg(target_os = "linux")]
pub(crate) mod ring;
mod route;
pub mod selfcheck;
pub mod service;
mod session;
pub mod sockets;
pub mod syslog;
pub mod tls;
mod udp;
pub mod upgrade;
mod util;
mod workers;

pub use app::{Server, Stopped, Upgrades};
pub use control::{
    Control, DrainProgress, Readiness, ReloadError, ReloadReport, RunningService, StartError,
};
pub use health::{AgentSays, Health};
pub use listener::BindError;
pub use outcome::Outcome;
pub use service::{Service, ServiceStats};

#[cfg(test)]
mod module_map {
    use std::collections::BTreeMap;

    /// The import order above: each module with its line's number.
    fn import_order() -> BTreeMap<String, u32> {
        let lib = include_str!("lib.rs");
        let (_, list) = lib
            .split_once("//! ## Import order")
            .expect("the import order");
        let mut order = BTreeMap::new();
        for line in list.lines().map(|l| l.trim_start_matches("//!").trim()) {
            let Some((n, mods)) = line.split_once(". ") else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            for m in mods.split(", ") {
                order.insert(m.trim_matches('`').to_string(), n);
            }
        }
        order
    }

    /// docs/architecture.md's module map is this file's import order: every module on the line
    /// of the same number, each once (`.ci/modgraph.py` checks the code against the list here).
    #[test]
    fn the_architecture_module_map_is_the_import_order() {
        let mut documented = BTreeMap::new();
        for row in crate::util::doc_table("architecture.md", "| order | module | owns |") {
            let n: u32 = row[0].parse().expect("an order number");
            for m in row[1].split(", ") {
                let m = m
                    .trim_matches('`')
                    .trim_end_matches('/')
                    .trim_end_matches(".rs");
                let again = documented.insert(m.to_string(), n);
                assert_eq!(again, None, "{m} is in the module map twice");
            }
        }
        let order = import_order();
        assert!(order.len() > 20, "the import order was not read: {order:?}");
        assert_eq!(documented, order);
    }
}
