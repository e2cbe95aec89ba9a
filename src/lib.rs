//! sluicegate: a layer-4 TCP load balancer.
//!
//! A connection flows through the modules in this order:
//!
//! - [`listener`]: binds the service sockets and runs the accept loop, which never dies (backs off on
//!   EMFILE/ENFILE, rate-limits its error logs) and enforces `max_connections`.
//! - [`session`]: one client's life: select, connect with retry on another backend, relay, account.
//! - [`balance`]: the selection policies (least_conn, round_robin, weighted_round_robin, p2c,
//!   source_hash), built per pool snapshot and lock-free on the hot path.
//! - [`pool`]: backends and their counters, membership by diff, eligibility (health, passive ejection,
//!   drain, slow start), and the snapshot the hot path reads.
//! - [`relay`]: moving bytes both ways with half-close and reset propagation, by copy or splice.
//! - [`routelog`]: the one routing-decision line per connection.
//! - [`workers`]: the data-plane threads (one single-threaded runtime per core) that accept and relay.
//!
//! Around them:
//!
//! - [`discovery`]: DNS names re-resolved on a timer into each pool's desired backend set.
//! - [`health`]: active probes (TCP, HTTP) and the rise/fall state machine that returns transitions.
//! - [`admin`]: the admin HTTP API, event stream and dashboard, on a thread of its own.
//! - [`metrics`]: Prometheus text rendering of every counter.
//! - [`events`]: the state-change events the admin API streams.
//! - [`config`]: the YAML schema and its validation, with key paths in every error.
//! - [`service`]: a configured service at run time: settings, pool, counters.
//! - [`lifecycle`]: bind, serve, reload as a difference, and drain on stop with a deadline.
//! - [`logging`]: text or JSON lines to stdout or a daily-rotated file.
//!
//! `main.rs` only parses the command line, loads the config, sets up logging and signals, and calls
//! [`lifecycle::run`]; tests drive [`lifecycle::Server`] directly.

pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod events;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod relay;
pub mod routelog;
pub mod service;
pub mod session;
pub mod workers;

pub use lifecycle::{run, Control, Server, StartError, Stopped};
