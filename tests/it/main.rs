//! sluicegate's integration tests, in one binary (one build and one link for the whole suite), one
//! module per area. Every test drives real sockets on loopback with ephemeral ports, real servers
//! where they exist (the Docker Engine, redis-server, Chromium, promtool, systemd-analyze), an
//! in-process DNS server, and waits on events with deadlines. `docs/reliability.md` names each
//! scenario with the test that proves it, as `module::test`.
//!
//! Run one area with a filter: `cargo test --test it admin::`. The long scenarios are `#[ignore]`d and
//! run by `.ci/run`: `soak::` (`SLUICEGATE_SOAK_SECS`), `full_size::` (release build); the fuzz
//! targets take `SLUICEGATE_FUZZ_CASES`.

mod common;

mod admin;
mod agreement;
mod bans;
mod checks;
mod cli;
mod console;
mod dashboard;
mod discovery;
mod edge;
mod engines;
mod failover;
mod full_size;
mod fuzz;
mod health;
mod keepalive;
mod labels;
mod lifecycle;
mod load;
mod monitoring;
mod relay;
mod reload;
mod replicas;
mod seed;
mod soak;
mod syslog;
mod tiers;
mod tls;
mod udp;
mod upgrade;
