//! sluicegate: a layer-4 TCP load balancer.
//!
//! A connection goes accept → (admit) → select → connect → relay → account, on the data-plane
//! threads; the control plane keeps what it selects from current; the surfaces show and steer both.
//!
//! **Data plane** (one single-threaded runtime per core, `workers`):
//! - `workers`: the data-plane threads.
//! - `listener`: binds the listening sockets and runs the accept loop, which never dies; one tracing
//!   span per connection.
//! - `ring_workers`: the data-plane threads of `relay: ring` services, one io_uring loop each (the
//!   loop itself is `relay/ring.rs`), and what they ask of a service: admission, a backend, the
//!   accounting of each connection's end (session's own); one tracing span per connection. A client
//!   accepted for an address no longer on the ring goes to `listener`'s tokio side.
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
//! - `relay`: moving bytes both ways with half-close and reset propagation: copy, splice, io_uring.
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
//! - [`selfcheck`]: the `healthcheck` subcommand's client (asks a running sluicegate's `/ready`).
//!
//! **Shared**: [`config`] (the YAML schema and its validation), [`sockets`] (listening sockets given
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
//! 4. `ring_workers`
//! 5. `listener`
//! 6. `session`
//! 7. `route`
//! 8. `service`
//! 9. `admission`, `replicas`
//! 10. `logging`, `pool`, `tls`
//! 11. `accesslog`, `balance`, `discovery`, `events`, `health`, `proxy_protocol`, `relay`, `selfcheck`
//! 12. `docker`
//! 13. `config`, `metrics`, `outcome`, `sockets`, `util`, `workers`
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
mod ring_workers;
mod route;
pub mod selfcheck;
pub mod service;
mod session;
pub mod sockets;
pub mod tls;
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
