//! sluicegate: a layer-4 TCP load balancer.
//!
//! The modules in the order a connection meets them (each imports only modules further down this
//! list, never one above it; `.ci/modgraph.py` checks that the graph has no cycle):
//!
//! - [`app`]: the application root: binds every service and the admin API, serves, drains.
//! - `admin`: the admin HTTP API, `/metrics`, the event stream and the dashboard, on a thread of its
//!   own; `metrics` renders the counters as Prometheus text.
//! - `control`: the registry of running services, reload as a pure plan and its application, the
//!   drain on stop.
//! - `workers`: the data-plane threads (one single-threaded runtime per core) that accept and relay.
//! - `listener`: binds the service sockets and runs the accept loop, which never dies.
//! - `session`: one client's life: the PROXY header in, admission, select, connect with retry on
//!   another backend, the PROXY header out, relay, account.
//! - `admission`: who may come in and how much they may take: the top-level cap, allow and deny
//!   lists, per-source limits, per-backend caps and their queue.
//! - [`proxy_protocol`]: PROXY protocol v1 and v2 headers, parsed and written.
//! - [`service`]: a configured service at run time: settings, pool, counters.
//! - [`pool`]: a service's backends and their counters, membership by difference, eligibility
//!   (health, passive ejection, drain, slow start), the probe loops, and the snapshot the hot path
//!   reads.
//! - `balance`: the selection policies (least_conn, round_robin, weighted_round_robin, p2c,
//!   source_hash), pure, over any backend-like `Candidate`.
//! - `health`: one active probe (TCP, HTTP) and the rise/fall state machine that returns transitions.
//! - `discovery`: DNS names re-resolved on a timer into claims on a pool.
//! - `relay`: moving bytes both ways with half-close and reset propagation, by copy or splice.
//! - [`routelog`]: the one routing-decision line per connection.
//! - [`outcome`]: how a connection ended, one type for the log, the counters and the metrics.
//! - `events`, [`logging`], [`config`], `util`: the state-change stream, log output, the YAML schema
//!   and its validation, and small shared pieces.
//!
//! `docs/architecture.md` walks one connection through these modules by file and function.
//! `main.rs` only parses the command line, loads the config, sets up logging and signals, and runs an
//! [`app::Server`]; tests drive the `Server` directly.

#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod admin;
mod admission;
pub mod app;
mod balance;
pub mod config;
mod control;
mod discovery;
mod events;
mod health;
pub mod healthcheck;
mod listener;
pub mod logging;
mod metrics;
pub mod outcome;
pub mod pool;
pub mod proxy_protocol;
mod relay;
mod replicas;
pub mod routelog;
pub mod service;
mod session;
mod util;
mod workers;

pub use app::{Server, Stopped};
pub use control::{
    Control, DrainProgress, Readiness, ReloadError, ReloadReport, ServiceView, StartError,
};
pub use health::Health;
pub use listener::BindError;
pub use outcome::Outcome;
pub use service::{Service, ServiceStats};
